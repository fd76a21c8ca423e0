"""FAQ table: import CSV/YAML/JSON (all or nothing, with line numbers), export round trip, edits, CLI."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bots.faq_cli import faq_app
from core.db.database import Database
from core.faq.repository import FaqImportError, FaqRepository, parse_faq_text

CSV_GOOD = (
    "\ufeffquestion,answer,language,alternatives,tags\n"
    '下单后多久发货？,"现货 48 小时内发货。\n预售以商品页为准。",zh,什么时候发货|多久能发出,"发货,物流"\n'
    "\n"
    "How do I return an item?,Open My orders and choose After-sales.,en,"
    "How do I send something back?,returns\n"
    "怎么开发票？,下单时填写发票抬头。,,,\n"
)

YAML_GOOD = """\
- question: 下单后多久发货？
  answer: 现货 48 小时内发货。
  alternatives: [什么时候发货, 多久能发出]
  tags: [发货]
- question: How do I return an item?
  answer: Open My orders and choose After-sales.
  language: en
  enabled: false
"""

JSON_GOOD = json.dumps(
    [
        {"question": "下单后多久发货？", "answer": "现货 48 小时内发货。", "alternatives": ["什么时候发货"]},
        {"question": "How do I return an item?", "answer": "Open My orders.", "language": "en"},
    ],
    ensure_ascii=False,
    indent=2,
)


def write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


async def test_csv_import_reads_every_field(database: Database, tmp_path: Path) -> None:
    repo = FaqRepository(db=database)
    report = await repo.import_file(write(tmp_path, "faq.csv", CSV_GOOD))
    assert (report.total, report.created, report.updated) == (3, 3, 0)
    entries = {e.question: e for e in await repo.list()}
    shipping = entries["下单后多久发货？"]
    assert shipping.answer == "现货 48 小时内发货。\n预售以商品页为准。"
    assert shipping.alternatives == ["什么时候发货", "多久能发出"]
    assert shipping.tags == ["发货", "物流"]
    assert shipping.language == "zh" and shipping.enabled
    assert entries["How do I return an item?"].language == "en"
    assert entries["怎么开发票？"].language == "zh" and entries["怎么开发票？"].alternatives == []


async def test_reimport_updates_in_place_and_never_duplicates(database: Database, tmp_path: Path) -> None:
    repo = FaqRepository(db=database)
    await repo.import_file(write(tmp_path, "faq.yaml", YAML_GOOD))
    again = await repo.import_file(write(tmp_path, "faq.yaml", YAML_GOOD))
    assert (again.created, again.updated, again.unchanged) == (0, 0, 2)
    assert not again.changed
    # Same question written differently (punctuation, width) is the same entry: its answer is updated.
    edited = YAML_GOOD.replace("下单后多久发货？", "下单后多久发货?").replace("48 小时", "24 小时")
    report = await repo.import_file(write(tmp_path, "faq.yaml", edited))
    assert (report.created, report.updated, report.unchanged) == (0, 1, 1)
    entries = await repo.list()
    assert len(entries) == 2
    assert [e.answer for e in entries if e.language == "zh"] == ["现货 24 小时内发货。"]
    assert [e.enabled for e in entries if e.language == "en"] == [False]


async def test_json_import(database: Database, tmp_path: Path) -> None:
    repo = FaqRepository(db=database)
    report = await repo.import_file(write(tmp_path, "faq.json", JSON_GOOD))
    assert report.created == 2
    assert {e.language for e in await repo.list()} == {"zh", "en"}


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "bad.csv",
            "question,answer,language\n"
            "好问题,好答案,zh\n"
            ",没有问题的答案,zh\n"
            "坏语言,答案,fr\n"
            '"跨行的\n问题",\n',
            {3: "question", 4: "language", 5: "answer"},
        ),
        (
            "bad.yaml",
            "- question: 好问题\n  answer: 好答案\n- question: 没有答案\n- just a string\n"
            "- question: 好问题\n  answer: 重复\n",
            {3: "answer", 4: "expected an object", 5: "line 1"},
        ),
        (
            "bad.json",
            '[\n  {"question": "好问题", "answer": "好答案"},\n  {"question": "q", "answer": ""},\n'
            '  {"question": "q2", "answer": "a", "alternatives": ["a|b"]}\n]\n',
            {3: "answer", 4: "alternatives"},
        ),
    ],
)
async def test_bad_rows_reject_the_whole_file_with_line_numbers(
    database: Database, tmp_path: Path, name: str, content: str, expected: dict[int, str]
) -> None:
    repo = FaqRepository(db=database)
    with pytest.raises(FaqImportError) as caught:
        await repo.import_file(write(tmp_path, name, content))
    problems = {p.line: p.message for p in caught.value.problems}
    assert set(problems) == set(expected)
    for line, fragment in expected.items():
        assert fragment in problems[line]
        assert f"line {line}:" in str(caught.value)
    assert await repo.list() == []  # the good rows were not imported either


def test_syntax_errors_name_their_line() -> None:
    with pytest.raises(FaqImportError) as caught:
        parse_faq_text('[\n{"question": "q", "answer": "a"},\n{"question": oops}\n]', "json")
    assert caught.value.problems[0].line == 3
    with pytest.raises(FaqImportError) as caught:
        parse_faq_text("question;answer\nq;a\n", "csv")
    assert "lacks column(s): question, answer" in str(caught.value)


@pytest.mark.parametrize("fmt", ["csv", "yaml", "json"])
async def test_export_round_trip(database: Database, tmp_path: Path, fmt: str) -> None:
    repo = FaqRepository(db=database)
    await repo.import_file(write(tmp_path, "faq.csv", CSV_GOOD))
    await repo.update((await repo.list())[0].id or 0, enabled=False)
    out = tmp_path / f"export.{fmt}"
    assert await repo.export(out) == 3

    def fields(entries: list) -> list[tuple]:  # type: ignore[type-arg]
        return sorted((e.question, e.answer, e.language, e.alternatives, e.tags, e.enabled) for e in entries)

    other_url = f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"
    from core.db.migrate import upgrade_async

    await upgrade_async(other_url)
    async with Database(url=other_url) as other:
        copy = FaqRepository(db=other)
        report = await copy.import_file(out)
        assert report.created == 3
        assert fields(await copy.list()) == fields(await repo.list())

    stream = io.StringIO()
    await repo.export(stream, fmt)  # type: ignore[arg-type]
    assert stream.getvalue() == out.read_text(encoding="utf-8")


async def test_edits_move_updated_at_and_delete_removes(database: Database) -> None:
    repo = FaqRepository(db=database)
    entry = await repo.add(question="运费怎么算？", answer="满 99 包邮。", tags=["运费"])
    assert entry.id is not None
    await asyncio.sleep(0.01)
    edited = await repo.update(entry.id, answer="满 88 包邮。")
    assert edited.answer == "满 88 包邮。"
    assert edited.updated_at - entry.updated_at > timedelta(0)
    with pytest.raises(ValueError, match="answer"):
        await repo.update(entry.id, answer="  ")
    with pytest.raises(KeyError):
        await repo.update(9999, answer="x")
    before = await repo.fingerprint()
    assert await repo.delete(entry.id)
    assert not await repo.delete(entry.id)
    assert await repo.get(entry.id) is None
    assert await repo.fingerprint() != before


def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(faq_app, name="faq")
    return app


def test_cli_import_and_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEFU_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    runner = CliRunner()
    good = write(tmp_path, "faq.csv", CSV_GOOD)
    result = runner.invoke(cli(), ["faq", "import", str(good)])
    assert result.exit_code == 0, result.output
    assert "3 added" in result.output

    bad = write(tmp_path, "bad.csv", "question,answer\nq,\n")
    result = runner.invoke(cli(), ["faq", "import", str(bad)])
    assert result.exit_code == 1
    assert "line 2: answer" in result.output

    result = runner.invoke(cli(), ["faq", "export", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)) == 3
