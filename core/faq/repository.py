"""The FAQ table: list, add, edit and delete entries; import and export CSV, YAML and JSON files.

File format (all three carry the same fields, one entry per row/object):

- ``question`` and ``answer`` (required, non-empty),
- ``language`` (``zh`` or ``en``, default ``zh``),
- ``alternatives``: other phrasings of the question; a list, or in CSV one cell separated by ``|``,
- ``tags``: a list, or in CSV one cell separated by ``|`` or ``,``,
- ``enabled`` (default true).

An import upserts: an entry whose question (compared after :func:`normalize_question`) and language
already exist is updated, anything else is added, so importing the same file twice changes nothing.
The whole file is checked first; any bad row rejects the import with every problem and its line number,
and nothing is written. The writes then happen in one transaction.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from sqlalchemy import func, update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from core.db.database import Database
from core.db.models import FaqEntry, utcnow
from core.errors import DatabaseError, KefuError
from core.faq.normalize import normalize_question
from core.messages import Language

__all__ = [
    "FORMATS",
    "FaqImportError",
    "FaqRepository",
    "FaqRow",
    "ImportReport",
    "RowProblem",
    "parse_faq_file",
]

log = logging.getLogger(__name__)

Format = Literal["csv", "yaml", "json"]
FORMATS: tuple[Format, ...] = ("csv", "yaml", "json")
FIELDS = ("question", "answer", "language", "alternatives", "tags", "enabled")
_SUFFIXES: dict[str, Format] = {".csv": "csv", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}
_TRUE = {"1", "true", "yes", "y", "on", "是"}
_FALSE = {"0", "false", "no", "n", "off", "否"}


class FaqImportError(KefuError):
    """A FAQ file cannot be imported; ``problems`` lists every bad row with its line number."""

    def __init__(self, source: str, problems: Sequence[RowProblem]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s), nothing imported:\n{lines}{more}")


@dataclass(frozen=True)
class RowProblem:
    """What is wrong with one row; ``line`` is the 1-based line where the row starts (0: whole file)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


class FaqRow(BaseModel):
    """One FAQ entry as read from a file, validated and cleaned."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, coerce_numbers_to_str=True)

    question: str
    answer: str
    language: Language = "zh"
    alternatives: list[str] = []
    tags: list[str] = []
    enabled: bool = True

    @field_validator("question", "answer")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("question")
    @classmethod
    def _short_question(cls, value: str) -> str:
        if len(value) > 500:
            raise ValueError("is longer than 500 characters")
        return value

    @field_validator("language", mode="before")
    @classmethod
    def _language(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return "zh"
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("alternatives", mode="before")
    @classmethod
    def _split_alternatives(cls, value: object) -> object:
        if value is None:
            return []
        if isinstance(value, str):
            return [part for part in (p.strip() for p in value.split("|")) if part]
        return value

    @field_validator("tags", mode="before")
    @classmethod
    def _split_tags(cls, value: object) -> object:
        if value is None:
            return []
        if isinstance(value, str):
            return [part for part in (p.strip() for p in value.replace(",", "|").split("|")) if part]
        return value

    @field_validator("alternatives", "tags")
    @classmethod
    def _clean_items(cls, value: list[str]) -> list[str]:
        # "|" would split the item in two on a CSV round trip; refuse it so every format is equivalent.
        items = [item.strip() for item in value if item.strip()]
        if any("|" in item for item in items):
            raise ValueError("an item must not contain '|'")
        return list(dict.fromkeys(items))

    @field_validator("enabled", mode="before")
    @classmethod
    def _flag(cls, value: object) -> object:
        if value is None:
            return True
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in _TRUE or not lowered:  # an empty cell keeps the default (enabled)
                return True
            if lowered in _FALSE:
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        return value

    @property
    def match_key(self) -> tuple[str, str]:
        """(language, normalised question): what an import matches existing entries on."""
        return self.language, normalize_question(self.question)


@dataclass
class ImportReport:
    """What an import did."""

    source: str
    total: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    ignored_columns: list[str] = field(default_factory=list)
    entry_ids: list[int] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """True when the import wrote anything (the FAQ cache and index need a refresh)."""
        return bool(self.created or self.updated)


# -- parsing -------------------------------------------------------------------------------------------


def detect_format(path: Path) -> Format:
    """The file format from the suffix (.csv, .yaml/.yml, .json)."""
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise FaqImportError(str(path), [RowProblem(0, "unknown file type: use .csv, .yaml, .yml or .json")])
    return fmt


def parse_faq_file(path: Path, fmt: Format | None = None) -> tuple[list[FaqRow], list[str]]:
    """Read and validate a FAQ file; returns the rows and the ignored column names.

    Raises :class:`FaqImportError` listing every bad row (with its line number) when any row is bad.
    """
    fmt = fmt or detect_format(path)
    try:
        content = path.read_text(encoding="utf-8-sig")  # a BOM from spreadsheet exports is dropped
    except (OSError, UnicodeDecodeError) as exc:
        raise FaqImportError(str(path), [RowProblem(0, f"cannot read the file: {exc}")]) from exc
    return parse_faq_text(content, fmt, source=str(path))


def parse_faq_text(content: str, fmt: Format, *, source: str = "<text>") -> tuple[list[FaqRow], list[str]]:
    """Validate FAQ rows in ``content`` (see :func:`parse_faq_file`)."""
    raw, ignored = {"csv": _csv_records, "yaml": _yaml_records, "json": _json_records}[fmt](content, source)
    rows: list[FaqRow] = []
    problems: list[RowProblem] = []
    first_line: dict[tuple[str, str], int] = {}
    for line, record in raw:
        if isinstance(record, RowProblem):
            problems.append(record)
            continue
        if not isinstance(record, Mapping):
            problems.append(RowProblem(line, "expected an object with question and answer"))
            continue
        try:
            row = FaqRow.model_validate(dict(record))
        except ValidationError as exc:
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"]) or "row"
                problems.append(RowProblem(line, f"{where}: {err['msg']}"))
            continue
        if row.match_key in first_line:
            problems.append(
                RowProblem(line, f"same question and language as line {first_line[row.match_key]}")
            )
            continue
        first_line[row.match_key] = line
        rows.append(row)
    if problems:
        raise FaqImportError(source, problems)
    return rows, ignored


def _csv_records(content: str, source: str) -> tuple[list[tuple[int, object]], list[str]]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    header = [name.strip().lower() for name in (reader.fieldnames or [])]
    missing = [name for name in ("question", "answer") if name not in header]
    if missing:
        raise FaqImportError(source, [RowProblem(1, f"the header row lacks column(s): {', '.join(missing)}")])
    reader.fieldnames = header
    ignored = [name for name in header if name and name not in FIELDS]
    records: list[tuple[int, object]] = []
    try:
        for record in reader:
            cells = [v for v in record.values() if isinstance(v, str)]
            # line_num is where the record ends; quoted cells may span lines.
            start = reader.line_num - sum(v.count("\n") for v in cells)
            if None in record:
                records.append((start, RowProblem(start, "more cells than header columns")))
            elif any(v.strip() for v in cells):  # rows of empty cells are skipped
                records.append((start, {k: v for k, v in record.items() if k in FIELDS}))
    except csv.Error as exc:
        raise FaqImportError(source, [RowProblem(reader.line_num, f"CSV syntax: {exc}")]) from exc
    return records, ignored


def _yaml_records(content: str, source: str) -> tuple[list[tuple[int, object]], list[str]]:
    try:
        node = yaml.compose(content, Loader=yaml.SafeLoader)
        data = yaml.safe_load(content)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise FaqImportError(source, [RowProblem(line, f"YAML syntax: {exc}")]) from exc
    if data is None:
        return [], []
    if not isinstance(data, list) or not isinstance(node, yaml.SequenceNode):
        raise FaqImportError(source, [RowProblem(1, "the top level must be a list of entries")])
    lines = [item.start_mark.line + 1 for item in node.value]
    return list(zip(lines, data, strict=True)), _ignored_keys(data)


def _json_records(content: str, source: str) -> tuple[list[tuple[int, object]], list[str]]:
    # The standard parser gives no positions for values, so the top-level array is walked by hand
    # and each element decoded with raw_decode: every entry keeps the line it starts on.
    decoder = json.JSONDecoder()
    pos = _skip_ws(content, 0)
    if pos >= len(content):
        return [], []
    if content[pos] != "[":
        raise FaqImportError(source, [RowProblem(_line_of(content, pos), "the top level must be a list")])
    records: list[tuple[int, object]] = []
    pos = _skip_ws(content, pos + 1)
    if pos < len(content) and content[pos] == "]":
        return [], []
    while True:
        try:
            value, end = decoder.raw_decode(content, pos)
        except json.JSONDecodeError as exc:
            raise FaqImportError(source, [RowProblem(exc.lineno, f"JSON syntax: {exc.msg}")]) from exc
        records.append((_line_of(content, pos), value))
        pos = _skip_ws(content, end)
        if pos < len(content) and content[pos] == ",":
            pos = _skip_ws(content, pos + 1)
            continue
        if pos < len(content) and content[pos] == "]" and not content[pos + 1 :].strip():
            break
        raise FaqImportError(source, [RowProblem(_line_of(content, pos), "JSON syntax: expected , or ]")])
    return records, _ignored_keys([value for _, value in records])


def _skip_ws(content: str, pos: int) -> int:
    while pos < len(content) and content[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_of(content: str, pos: int) -> int:
    return content.count("\n", 0, pos) + 1


def _ignored_keys(records: Iterable[object]) -> list[str]:
    keys: dict[str, None] = {}
    for record in records:
        if isinstance(record, Mapping):
            keys.update({str(k): None for k in record if k not in FIELDS})
    return list(keys)


# -- export --------------------------------------------------------------------------------------------


def _export_record(entry: FaqEntry) -> dict[str, Any]:
    return {
        "question": entry.question,
        "answer": entry.answer,
        "language": entry.language,
        "alternatives": list(entry.alternatives),
        "tags": list(entry.tags),
        "enabled": entry.enabled,
    }


def render_faq(entries: Sequence[FaqEntry], fmt: Format) -> str:
    """The entries as a file in ``fmt`` that :func:`parse_faq_text` reads back to the same rows."""
    records = [_export_record(e) for e in entries]
    if fmt == "json":
        return json.dumps(records, ensure_ascii=False, indent=2) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(records, allow_unicode=True, sort_keys=False, width=1000)
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(FIELDS), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow(
            {
                **record,
                "alternatives": "|".join(record["alternatives"]),
                "tags": "|".join(record["tags"]),
                "enabled": "true" if record["enabled"] else "false",
            }
        )
    return out.getvalue()


# -- the repository ------------------------------------------------------------------------------------

_EDITABLE = frozenset({"question", "answer", "language", "alternatives", "tags", "enabled"})


class FaqRepository:
    """FAQ entries in SQL. Every mutation returns what changed so the caller can refresh the cache."""

    def __init__(self, *, db: Database) -> None:
        self._db = db

    @property
    def db(self) -> Database:
        return self._db

    async def list(self, *, language: str | None = None, enabled_only: bool = False) -> list[FaqEntry]:
        """Entries ordered by language and id."""
        query = select(FaqEntry)
        if language is not None:
            query = query.where(FaqEntry.language == language)
        if enabled_only:
            query = query.where(col(FaqEntry.enabled).is_(True))
        async with self._session_errors("list FAQ entries"), self._db.session() as session:
            return list((await session.exec(query.order_by(col(FaqEntry.language), col(FaqEntry.id)))).all())

    async def get(self, entry_id: int) -> FaqEntry | None:
        async with self._session_errors("read a FAQ entry"), self._db.session() as session:
            return await session.get(FaqEntry, entry_id)

    async def add(
        self,
        *,
        question: str,
        answer: str,
        language: Language = "zh",
        alternatives: Sequence[str] = (),
        tags: Sequence[str] = (),
        enabled: bool = True,
    ) -> FaqEntry:
        """Add an entry (validated like an imported row) and return it with its id."""
        row = _validated(
            question=question,
            answer=answer,
            language=language,
            alternatives=list(alternatives),
            tags=list(tags),
            enabled=enabled,
        )
        entry = FaqEntry(**row.model_dump())
        async with self._session_errors("add a FAQ entry"), self._db.session() as session:
            session.add(entry)
            await session.commit()
            await session.refresh(entry)
        return entry

    async def update(self, entry_id: int, **fields: Any) -> FaqEntry:
        """Change fields of an entry (``updated_at`` moves); KeyError when it does not exist."""
        unknown = set(fields) - _EDITABLE
        if unknown:
            raise TypeError(f"not editable: {', '.join(sorted(unknown))}")
        async with self._session_errors("update a FAQ entry"), self._db.session() as session:
            entry = await session.get(FaqEntry, entry_id)
            if entry is None:
                raise KeyError(entry_id)
            row = _validated(**{**_export_record(entry), **fields})
            for name, value in row.model_dump().items():
                setattr(entry, name, value)
            entry.updated_at = utcnow()
            session.add(entry)
            await session.commit()
            await session.refresh(entry)
        return entry

    async def set_generated(self, entry: FaqEntry, phrasings: Sequence[str], *, written_for: str) -> bool:
        """Store the phrasings the model wrote for ``entry`` (``written_for``: the hash of the question and
        answer they were written for); False when the entry is gone or its question, answer or language
        changed meanwhile, so phrasings of an old wording are never stored against a new one."""
        statement = (
            update(FaqEntry)
            .where(
                col(FaqEntry.id) == entry.id,
                col(FaqEntry.question) == entry.question,
                col(FaqEntry.answer) == entry.answer,
                col(FaqEntry.language) == entry.language,
            )
            .values(generated=list(phrasings), generated_for=written_for, updated_at=utcnow())
        )
        async with self._session_errors("store generated FAQ phrasings"), self._db.session() as session:
            result = await session.exec(statement)
            await session.commit()
        return bool(result.rowcount)

    async def drop_generated(self, entry_id: int, numbers: Sequence[int]) -> FaqEntry:
        """Remove the model's phrasings number ``numbers`` (1-based, as listed) from an entry. They are not
        written again until the entry's text changes. KeyError when the entry does not exist, ValueError
        for a number it does not have."""
        entry = await self.get(entry_id)
        if entry is None:
            raise KeyError(entry_id)
        bad = [n for n in numbers if not 1 <= n <= len(entry.generated)]
        if bad:
            raise ValueError(f"entry {entry_id} has {len(entry.generated)} phrasing(s); no number {bad[0]}")
        dropped = set(numbers)
        kept = [text for n, text in enumerate(entry.generated, start=1) if n not in dropped]
        await self.set_generated(entry, kept, written_for=entry.generated_for or "")
        entry.generated = kept
        return entry

    async def delete(self, entry_id: int) -> bool:
        """Delete an entry (the wordings learned for it go with it: ON DELETE CASCADE); False when it did
        not exist."""
        async with self._session_errors("delete a FAQ entry"), self._db.session() as session:
            entry = await session.get(FaqEntry, entry_id)
            if entry is None:
                return False
            await session.delete(entry)
            await session.commit()
        return True

    async def fingerprint(self) -> str:
        """Changes whenever an entry is added, edited or deleted (count, last id, last update)."""
        query = select(func.count(), func.max(FaqEntry.id), func.max(FaqEntry.updated_at))
        async with self._session_errors("read the FAQ fingerprint"), self._db.session() as session:
            count, last_id, last_update = (await session.exec(query)).one()
        stamp = last_update.isoformat() if isinstance(last_update, datetime) else str(last_update)
        return f"{count}:{last_id}:{stamp}"

    async def import_file(
        self,
        path: Path,
        *,
        fmt: Format | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ImportReport:
        """Import a CSV, YAML or JSON file (see the module docstring); all rows or none.

        ``progress(done, total)`` is called as rows are written. Raises :class:`FaqImportError`.
        """
        rows, ignored = await asyncio.to_thread(parse_faq_file, path, fmt)
        report = await self.import_rows(rows, source=str(path), progress=progress)
        report.ignored_columns = ignored
        return report

    async def import_rows(
        self,
        rows: Sequence[FaqRow],
        *,
        source: str = "<rows>",
        progress: Callable[[int, int], None] | None = None,
    ) -> ImportReport:
        """Upsert validated rows in one transaction, matching on (language, normalised question)."""
        report = ImportReport(source=source, total=len(rows))
        async with self._session_errors("import FAQ entries"), self._db.session() as session:
            existing: dict[tuple[str, str], FaqEntry] = {}
            for stored in (await session.exec(select(FaqEntry).order_by(col(FaqEntry.id)))).all():
                existing.setdefault((stored.language, normalize_question(stored.question)), stored)
            touched: list[FaqEntry] = []
            for done, row in enumerate(rows, start=1):
                values = row.model_dump()
                entry = existing.get(row.match_key)
                if entry is None:
                    entry = FaqEntry(**values)
                    session.add(entry)
                    report.created += 1
                elif _export_record(entry) != values:
                    for name, value in values.items():
                        setattr(entry, name, value)
                    entry.updated_at = utcnow()
                    session.add(entry)
                    report.updated += 1
                else:
                    report.unchanged += 1
                touched.append(entry)
                if progress is not None:
                    progress(done, len(rows))
            # One commit: a failure anywhere above leaves the table as it was.
            await session.commit()
            report.entry_ids = [e.id for e in touched if e.id is not None]
        log.info(
            "FAQ import %s: %d created, %d updated, %d unchanged",
            source,
            report.created,
            report.updated,
            report.unchanged,
        )
        return report

    async def export(self, target: Path | TextIO, fmt: Format | None = None) -> int:
        """Write every entry to a file or stream in ``fmt`` (from the suffix when a path); returns count."""
        if fmt is None:
            if not isinstance(target, Path):
                raise ValueError("give fmt when exporting to a stream")
            fmt = detect_format(target)
        entries = await self.list()
        content = render_faq(entries, fmt)
        if isinstance(target, Path):
            await asyncio.to_thread(target.write_text, content, encoding="utf-8", newline="")
        else:
            await asyncio.to_thread(target.write, content)
        return len(entries)

    def _session_errors(self, action: str) -> _DbErrors:
        return _DbErrors(action)


class _DbErrors:
    """Maps SQLAlchemy errors to DatabaseError (an async context manager, combined with the session)."""

    def __init__(self, action: str) -> None:
        self._action = action

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, SQLAlchemyError):
            raise DatabaseError(f"could not {self._action}: {exc}") from exc


def _validated(**values: Any) -> FaqRow:
    try:
        return FaqRow.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid FAQ entry: {problems}") from exc
