"""Wordings learned from customers' picks: kept per entry, counted, reviewed, and then answered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bots.faq_cli import faq_app
from core.db.database import Database
from core.faq.learning import LearnedPhrasings, learnable
from core.faq.repository import FaqRepository
from core.faq.retriever import FaqDoc, FaqRetriever


@pytest.mark.parametrize(
    "question",
    [
        "我的订单 KF2025001 怎么还没到",  # an order number
        "call me on 13812345678 about my card",  # a phone number
        "send it to jane@example.com please",  # an e-mail address
        "x" * 201,
        "   ",
        "refund | cancel",
    ],
)
def test_personal_or_unusable_wordings_are_never_kept(question: str) -> None:
    assert learnable(question) is None


def test_a_wording_is_kept_as_typed_with_whitespace_collapsed() -> None:
    assert learnable("  退货运费  谁出？ ") == "退货运费 谁出？"
    assert learnable("I was charged 2 times") == "I was charged 2 times"


async def test_picks_are_counted_per_wording_and_entry(database: Database) -> None:
    repo = FaqRepository(db=database)
    returns = await repo.add(question="退货政策是什么？", answer="七天无理由退货。")
    shipping = await repo.add(question="多久发货？", answer="48 小时内发货。")
    assert returns.id is not None and shipping.id is not None
    learned = LearnedPhrasings(db=database)
    assert await learned.record_pick(entry_id=returns.id, question="退货运费谁出？")
    # The same wording (normalised: punctuation, width, script) counts on the same row.
    assert await learned.record_pick(entry_id=returns.id, question="退貨運費誰出")
    assert await learned.record_pick(entry_id=shipping.id, question="退货运费谁出？")
    assert not await learned.record_pick(entry_id=returns.id, question="订单 KF2025001 能退货吗")
    assert not await learned.record_pick(entry_id=9999, question="退货运费谁出？")  # entry deleted since
    rows = await learned.wordings()
    assert [(r.entry_id, r.phrasing, r.picks, r.status) for r in rows] == [
        (returns.id, "退货运费谁出？", 2, "pending"),
        (shipping.id, "退货运费谁出？", 1, "pending"),
    ]
    assert [r.picks for r in await learned.wordings(min_picks=2)] == [2]


async def test_a_reprocessed_pick_is_counted_once(database: Database) -> None:
    entry = await FaqRepository(db=database).add(question="多久发货？", answer="48 小时内发货。")
    assert entry.id is not None
    learned = LearnedPhrasings(db=database)
    for pick in ("web:a:m2", "web:a:m2", "web:b:m9"):  # m2 again: its first attempt crashed after counting
        assert await learned.record_pick(entry_id=entry.id, question="什么时候寄出", pick_id=pick)
    assert [r.picks for r in await learned.wordings()] == [2]


async def test_concurrent_first_picks_make_one_row(database: Database) -> None:
    entry = await FaqRepository(db=database).add(question="How long does shipping take?", answer="2-5 days.")
    assert entry.id is not None
    learned = LearnedPhrasings(db=database)
    await asyncio.gather(
        *(learned.record_pick(entry_id=entry.id, question="where is my parcel") for _ in range(5))
    )
    rows = await learned.wordings()
    assert [(r.phrasing, r.picks) for r in rows] == [("where is my parcel", 5)]


async def test_an_accepted_wording_becomes_an_alternative_that_retrieval_finds(database: Database) -> None:
    repo = FaqRepository(db=database)
    returns = await repo.add(
        question="退货政策是什么？", answer="七天无理由退货。", alternatives=["怎么退货"]
    )
    invoice = await repo.add(question="怎么开发票？", answer="在订单页申请电子发票。")
    assert returns.id is not None and invoice.id is not None
    learned = LearnedPhrasings(db=database)
    for _ in range(3):
        await learned.record_pick(entry_id=returns.id, question="买错了东西能寄回去吗")
    await learned.record_pick(entry_id=invoice.id, question="能给我开个票吗")
    await learned.record_pick(entry_id=returns.id, question="怎么退货！")  # already an alternative

    docs = [FaqDoc(e.id or 0, e.question, e.alternatives, e.answer, e.language) for e in await repo.list()]
    before = FaqRetriever.build(docs, embedder=None).best("买错了东西能寄回去吗")
    assert before is None or before.doc_id != returns.id

    accepted = await learned.accept(min_picks=1)
    assert len(accepted) == 3
    rows = {r.phrasing: r.status for r in await learned.wordings(status=None)}
    assert set(rows.values()) == {"accepted"}
    entry = await repo.get(returns.id)
    assert entry is not None and entry.alternatives == ["怎么退货", "买错了东西能寄回去吗"]
    docs = [FaqDoc(e.id or 0, e.question, e.alternatives, e.answer, e.language) for e in await repo.list()]
    after = FaqRetriever.build(docs, embedder=None).best("买错了东西能寄回去吗")
    assert after is not None and after.doc_id == returns.id


async def test_rejected_wordings_are_not_proposed_again(database: Database) -> None:
    entry = await FaqRepository(db=database).add(question="多久发货？", answer="48 小时内发货。")
    assert entry.id is not None
    learned = LearnedPhrasings(db=database)
    await learned.record_pick(entry_id=entry.id, question="你们是不是骗子")
    [row] = await learned.wordings()
    assert await learned.reject([row.id]) == 1
    await learned.record_pick(entry_id=entry.id, question="你们是不是骗子")
    assert await learned.wordings() == []
    assert await learned.accept([row.id]) == []  # only pending wordings can be accepted
    assert (await FaqRepository(db=database).get(entry.id)).alternatives == []  # type: ignore[union-attr]


async def test_deleting_an_entry_deletes_its_wordings(database: Database) -> None:
    repo = FaqRepository(db=database)
    entry = await repo.add(question="多久发货？", answer="48 小时内发货。")
    assert entry.id is not None
    learned = LearnedPhrasings(db=database)
    await learned.record_pick(entry_id=entry.id, question="什么时候寄出")
    assert await repo.delete(entry.id)
    assert await learned.wordings(status=None) == []


def test_cli_lists_accepts_and_rejects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("KEFU_DATABASE_URL", url)
    app = typer.Typer()
    app.add_typer(faq_app, name="faq")
    runner = CliRunner()
    result = runner.invoke(app, ["faq", "learned"])
    assert result.exit_code == 0, result.output
    assert "no wordings waiting for review" in result.output

    async def seed() -> None:
        async with Database(url=f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}") as db:
            entry = await FaqRepository(db=db).add(question="多久发货？", answer="48 小时内发货。")
            assert entry.id is not None
            learned = LearnedPhrasings(db=db)
            await learned.record_pick(entry_id=entry.id, question="什么时候寄出")
            await learned.record_pick(entry_id=entry.id, question="什么时候寄出")
            await learned.record_pick(entry_id=entry.id, question="发了没")

    asyncio.run(seed())
    result = runner.invoke(app, ["faq", "learned"])
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines()[1:]]
    assert [line[:3] for line in lines] == [["1", "2", "pending"], ["2", "1", "pending"]]
    assert "什么时候寄出" in result.output and "多久发货？" in result.output

    result = runner.invoke(app, ["faq", "accept"])
    assert result.exit_code == 2 and "--min-picks" in result.output
    result = runner.invoke(app, ["faq", "accept", "--min-picks", "2"])
    assert result.exit_code == 0 and "1 wording(s) added" in result.output
    result = runner.invoke(app, ["faq", "reject", "2"])
    assert result.exit_code == 0 and "1 wording(s) rejected" in result.output
    result = runner.invoke(app, ["faq", "learned", "--all"])
    assert "accepted" in result.output and "rejected" in result.output
    result = runner.invoke(app, ["faq", "export", "--format", "csv"])
    assert "什么时候寄出" in result.output  # now an alternative of the entry
