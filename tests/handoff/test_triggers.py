"""The hand-off triggers the engine calls after a turn, and the console's state changes."""

from __future__ import annotations

from typing import Any

from sqlmodel import select

from core import handoff
from core.conversations import ConversationStore
from core.db.database import Database
from core.db.models import Message, Ticket
from core.messages import ConversationKey

KEY = ConversationKey(channel="web", chat_id="session-0001")


async def _open(database: Database) -> tuple[ConversationStore, int]:
    store = ConversationStore(db=database)
    conversation = await store.get_or_create(KEY, user_id="u1", language="zh")
    assert conversation.id is not None
    return store, conversation.id


async def _turn(
    store: ConversationStore, cid: int, n: int, meta: dict[str, Any], role: str = "assistant"
) -> None:
    await store.append(
        cid,
        [
            Message(conversation_id=cid, role="user", content=f"question {n}", platform_message_id=f"m{n}"),
            Message(conversation_id=cid, role=role, content=f"answer {n}", meta=meta),
        ],
    )


async def _request(store: ConversationStore, cid: int, n: int) -> str | None:
    return await handoff.maybe_request_human(store, conversation_id=cid, key=KEY, message_id=f"m{n}")


async def _state(store: ConversationStore, cid: int) -> str:
    conversation = await store.get_by_id(cid)
    assert conversation is not None
    return conversation.state


BLOCKED = {"guard": "prompt_injection", "rule": "r1"}
UNKNOWN = {"fallback": "unknown", "confidence": None}


async def test_three_guard_blocks_in_a_row_ask_for_a_person(database: Database) -> None:
    store, cid = await _open(database)
    await _turn(store, cid, 1, BLOCKED)
    await _turn(store, cid, 2, {"latency_ms": 10})  # a normal answer breaks the streak
    await _turn(store, cid, 3, BLOCKED)
    await _turn(store, cid, 4, BLOCKED)
    assert await _request(store, cid, 4) is None
    assert await _state(store, cid) == "bot"
    await _turn(store, cid, 5, BLOCKED)
    assert await _request(store, cid, 5) == "guard_blocks"
    assert await _state(store, cid) == "waiting"
    async with database.session() as session:
        tickets = (await session.exec(select(Ticket))).all()
    assert [(t.category, t.conversation_id) for t in tickets] == [("handoff", cid)]
    assert "input guard" in tickets[0].summary


async def test_unsure_fallback_answers_ask_for_a_person(database: Database) -> None:
    store, cid = await _open(database)
    await _turn(store, cid, 1, {"fallback": "faq", "confidence": 0.9})
    await _turn(store, cid, 2, UNKNOWN)
    assert await _request(store, cid, 2) is None
    await _turn(store, cid, 3, {"fallback": "faq", "confidence": 0.2})
    assert await _request(store, cid, 3) == "low_confidence"
    assert await _state(store, cid) == "waiting"


async def test_faq_suggestions_are_unsure_and_a_picked_answer_breaks_the_streak(database: Database) -> None:
    store, cid = await _open(database)
    suggest = {"fallback": "suggest", "confidence": 0.3, "suggested": [4, 2, 9], "asked": "m1"}
    await _turn(store, cid, 1, suggest)
    await _turn(store, cid, 2, {"fallback": "picked", "faq_entry": 4})  # the customer chose an answer
    await _turn(store, cid, 3, suggest)
    assert await _request(store, cid, 3) is None
    await _turn(store, cid, 4, suggest)  # two lists in a row: the bot is not helping
    assert await _request(store, cid, 4) == "low_confidence"
    assert await _state(store, cid) == "waiting"


async def test_a_conversation_handed_back_starts_counting_afresh(database: Database) -> None:
    store, cid = await _open(database)
    for n in (1, 2):
        await _turn(store, cid, n, UNKNOWN)
    assert await _request(store, cid, 2) == "low_confidence"
    assert await handoff.take_over(store, cid)
    assert not await handoff.take_over(store, cid)  # already held
    assert await handoff.return_to_bot(store, cid)
    assert not await handoff.return_to_bot(store, cid)  # not paused any more
    await store.append(
        cid,
        [
            Message(
                conversation_id=cid, role="assistant", content="bot is back", meta={"handoff": "agent_left"}
            )
        ],
    )
    await _turn(store, cid, 3, UNKNOWN)
    assert await _request(store, cid, 3) is None  # one unsure answer since the hand-back
    assert await _state(store, cid) == "bot"


async def test_an_agent_reply_is_not_counted_as_a_bot_failure(database: Database) -> None:
    store, cid = await _open(database)
    await _turn(store, cid, 1, UNKNOWN)
    await _turn(store, cid, 2, {}, role="agent")
    await _turn(store, cid, 3, UNKNOWN)
    assert await _request(store, cid, 3) is None
