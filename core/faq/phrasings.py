"""Phrasings the model writes for FAQ entries, so the fallback still knows customers' words when it is down.

An operator writes one question per entry; customers ask in their own words, and with one phrasing per
entry the retriever matches about two thirds of them (``bench/faq_eval.py``). While the model is up,
kefu asks it how customers would ask each entry's question (:class:`PhrasingWriter`, one request per
entry, a JSON answer) and indexes what it writes next to the operator's phrasings. A written phrasing is
kept only when:

- it passes :func:`~core.faq.learning.learnable` (no order number, phone number or e-mail address, at
  most 200 characters, no "|") and is in the entry's language;
- it is new for the entry (compared after :func:`~core.faq.normalize.normalize_question`);
- the current index ranks its own entry first: a phrasing closer to another entry is ambiguous, and
  answering it from this entry would cost precision. This check also throws away what a small model
  writes when it cannot paraphrase (the embedded SmolLM2 repeats or drifts).

Kept phrasings live on the entry (``faq_entries.generated``) with the hash of the question, answer and
language they were written for (``generated_for``). When an operator edits the entry they stop being
indexed at once and :func:`expand_faq` writes new ones. They are used for retrieval only (the fallback
and ``search_faq``): the exact-match cache and ``kefu faq export`` keep to the operator's phrasings; the
console lists the model's apart, and an operator can drop a bad one.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Final

from core.db.models import FaqEntry
from core.errors import LLMError, ModelOutputError
from core.faq.learning import learnable
from core.faq.normalize import normalize_question
from core.faq.repository import FaqRepository
from core.faq.retriever import FaqRetriever
from core.language import detect_language
from core.llm.base import ChatMessage, ChatModel, ChatRequest

if TYPE_CHECKING:
    from core.faq.service import RetrieverHolder

__all__ = [
    "DEFAULT_PHRASINGS",
    "ExpandReport",
    "PhrasingWriter",
    "clean_phrasings",
    "current_generated",
    "expand_faq",
    "needs_phrasings",
    "source_key",
    "unambiguous",
]

log = logging.getLogger(__name__)

DEFAULT_PHRASINGS: Final = 16
"""Phrasings asked for per entry (``KEFU_FAQ_PHRASINGS``); the published figures use 16."""

INSTRUCTIONS: Final = (
    "You help a customer-service team. Given one FAQ question, write alternative phrasings: ways real "
    "customers would ask for exactly the same thing. Keep the meaning and the scope: no broader or "
    "narrower question, and no neighbouring problem. Vary the wording, the sentence form (questions, "
    "statements of the problem, short fragments) and the register (casual, frustrated, polite). Write in "
    "the language of the FAQ question. Never include names, order numbers, phone numbers or e-mail "
    'addresses. Reply with JSON: {"phrasings": ["...", "..."]}.'
)

_SCHEMA: Final = {
    "type": "object",
    "properties": {"phrasings": {"type": "array", "items": {"type": "string"}}},
    "required": ["phrasings"],
}
# List markers and quotes models add around a phrasing despite the instructions.
_QUOTES: Final = "\"'“”‘’「」"
_DECORATION: Final = re.compile(
    rf"^\s*(?:[-*•·]|\d{{1,2}}[.)、:]|[（(]\d{{1,2}}[)）])?\s*[{_QUOTES}]?|[{_QUOTES}]?\s*$"
)
_TOKENS_PER_PHRASING: Final = 40


def source_key(entry: FaqEntry) -> str:
    """What generated phrasings are valid for: a hash of the entry's language, question and answer."""
    text = "\x1f".join((entry.language, entry.question, entry.answer))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def current_generated(entry: FaqEntry) -> tuple[str, ...]:
    """The entry's generated phrasings, or none when they were written for an earlier wording."""
    if entry.generated and entry.generated_for == source_key(entry):
        return tuple(entry.generated)
    return ()


def needs_phrasings(entry: FaqEntry) -> bool:
    """True for an enabled entry whose phrasings were never written, or were written for older text."""
    return entry.enabled and entry.generated_for != source_key(entry)


class PhrasingWriter:
    """Asks the model for ``count`` customer phrasings of an entry's question and cleans what it writes."""

    def __init__(self, *, model: ChatModel, count: int = DEFAULT_PHRASINGS) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self._model = model
        self._count = count

    def request(self, entry: FaqEntry) -> ChatRequest:
        """The model request for ``entry`` (its answer goes along, so the model keeps to its scope)."""
        return ChatRequest(
            messages=(
                ChatMessage.system(INSTRUCTIONS),
                ChatMessage.user(
                    f"FAQ question: {entry.question}\n"
                    f"Its answer, for context: {entry.answer}\n"
                    f"Write {self._count} phrasings."
                ),
            ),
            json_schema=_SCHEMA,
            temperature=0.8,
            max_tokens=self._count * _TOKENS_PER_PHRASING,
        )

    async def write(self, entry: FaqEntry) -> list[str]:
        """Phrasings for ``entry``, cleaned (:func:`clean_phrasings`); raises LLMError when the model
        fails."""
        response = await self._model.complete(self.request(entry))
        try:
            decoded = response.decode_json()
            raw = decoded.get("phrasings", []) if isinstance(decoded, dict) else decoded
        except ModelOutputError:
            raw = response.content.splitlines()  # a backend that ignored the schema: one per line
        return clean_phrasings(entry, raw if isinstance(raw, list) else [], count=self._count)


def clean_phrasings(entry: FaqEntry, raw: Sequence[object], *, count: int) -> list[str]:
    """The first ``count`` strings of ``raw`` that are learnable, in the entry's language and new for the
    entry (list markers and quotes a model adds are taken off first)."""
    seen = {normalize_question(t) for t in (entry.question, *entry.alternatives)}
    kept: list[str] = []
    for item in raw:
        if not isinstance(item, str):
            continue
        wording = learnable(_DECORATION.sub("", item))
        if wording is None or detect_language(wording) != entry.language:
            continue
        key = normalize_question(wording)
        if not key or key in seen:
            continue
        seen.add(key)
        kept.append(wording)
        if len(kept) == count:
            break
    return kept


def unambiguous(retriever: FaqRetriever, entry: FaqEntry, phrasings: Sequence[str]) -> list[str]:
    """The phrasings for which ``retriever`` ranks ``entry`` first among the entries of its language."""
    kept = []
    for phrasing in phrasings:
        hits = retriever.search(phrasing, k=1, language=entry.language)
        if hits and hits[0].doc_id == entry.id:
            kept.append(phrasing)
    return kept


@dataclass
class ExpandReport:
    """What one :func:`expand_faq` run did."""

    entries: int = 0
    """Entries that got phrasings."""
    phrasings: int = 0
    """Phrasings stored."""
    ambiguous: int = 0
    """Phrasings dropped because the index ranked another entry first."""
    failed: list[int] = field(default_factory=list)
    """Entries the model could not write for (the run stops at the first model failure)."""
    waiting: int = 0
    """Entries still without current phrasings after the run."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def expand_faq(
    *,
    repository: FaqRepository,
    writer: PhrasingWriter,
    retriever_holder: RetrieverHolder,
    entry_ids: Sequence[int] | None = None,
    limit: int | None = None,
    rewrite: bool = False,
) -> ExpandReport:
    """Write phrasings for up to ``limit`` entries that need them (``entry_ids``: those entries only;
    ``rewrite``: even when their phrasings are current), oldest first.

    The index in ``retriever_holder`` is rebuilt from the table first unless it is current, so the
    ambiguity check sees every entry as it is now. A model failure ends the run: the entry is reported
    in ``failed`` and is tried again next run; nothing already stored is lost.
    """
    entries = await repository.list(enabled_only=True)
    fingerprint = await repository.fingerprint()
    wanted = set(entry_ids) if entry_ids is not None else None
    todo = [
        e
        for e in entries
        if e.id is not None and (wanted is None or e.id in wanted) and (rewrite or needs_phrasings(e))
    ]
    report = ExpandReport()
    if not todo:
        return report
    retriever = retriever_holder.retriever
    if retriever is None or retriever_holder.fingerprint != fingerprint or not retriever.uses_embedder:
        retriever = await retriever_holder.rebuild(entries, fingerprint=fingerprint)
    batch = todo if limit is None else todo[:limit]
    for entry in batch:
        try:
            written = await writer.write(entry)
        except LLMError as exc:
            log.warning("FAQ phrasings not written for entry %s: %s", entry.id, exc)
            report.failed.append(entry.id or 0)
            break
        kept = unambiguous(retriever, entry, written)
        report.ambiguous += len(written) - len(kept)
        if await repository.set_generated(entry, kept, written_for=source_key(entry)):
            report.entries += 1
            report.phrasings += len(kept)
            log.info("FAQ entry %s: %d phrasings written, %d kept", entry.id, len(written), len(kept))
    report.waiting = len(todo) - report.entries
    return report
