"""``kefu chat`` driven through pipes: one answer line per message, history per session."""

from __future__ import annotations

import io

from sqlmodel import select

from bots.terminal import default_session, one_line, run_chat, valid_session
from core.db.database import Database
from core.db.models import Conversation
from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from core.settings import Settings
from tests.bots.conftest import last_user_text


def two_line_answer(request: ChatRequest) -> str:
    return f"第一行：{last_user_text(request)}\n\n second line"


async def test_piped_lines_get_one_answer_line_each(settings: Settings) -> None:
    stdin = io.StringIO("你好\n\n   \n我的订单KF20251103001到哪了\n")
    stdout = io.StringIO()
    await run_chat(settings, session="li", model=FunctionModel(two_line_answer), stdin=stdin, stdout=stdout)
    assert stdout.getvalue().splitlines() == [
        "第一行：你好 second line",
        "第一行：我的订单KF20251103001到哪了 second line",
    ]


async def test_exit_ends_the_chat_and_later_lines_are_not_answered(settings: Settings) -> None:
    model = FunctionModel(two_line_answer)
    stdout = io.StringIO()
    await run_chat(
        settings, session="li", model=model, stdin=io.StringIO("hello\nquit\nnever\n"), stdout=stdout
    )
    assert len(stdout.getvalue().splitlines()) == 1
    assert [last_user_text(r) for r in model.requests] == ["hello"]


async def test_the_session_names_the_conversation_and_history_carries_over(
    settings: Settings, db_url: str
) -> None:
    model = FunctionModel(two_line_answer)
    await run_chat(
        settings, session="li", model=model, stdin=io.StringIO("my name is Li\n"), stdout=io.StringIO()
    )
    await run_chat(settings, session="li", model=model, stdin=io.StringIO("who am I\n"), stdout=io.StringIO())
    await run_chat(
        settings, session="wang", model=model, stdin=io.StringIO("who am I\n"), stdout=io.StringIO()
    )
    assert "my name is Li" in [m.content for m in model.requests[1].messages]
    assert "my name is Li" not in [m.content for m in model.requests[2].messages]
    async with Database(url=db_url) as db, db.session() as session:
        keys = sorted(c.key for c in (await session.exec(select(Conversation))).all())
    assert keys == ["terminal:li", "terminal:wang"]


def test_session_names() -> None:
    assert valid_session(default_session())
    assert valid_session("zhang.wei@shop")
    assert not valid_session("a:b")
    assert not valid_session("")
    assert one_line("  a\n\n b \n c ") == "a b c"
