"""The output moderator: checks model answers before customers see them, whole or while streamed.

Three checks, each naming the category and rule that fired:

``lexicon``        operator-editable phrase lists (``data/output/*.txt``, ``<category> | <phrase>``) matched
                   with Aho-Corasick on the input guard's canonical characters (full-width → half-width,
                   traditional → simplified, look-alike letters, invisible characters dropped). Chinese
                   phrases match anywhere, also across spaces and punctuation; Latin phrases match whole
                   words. ``policy.yaml`` gives each category ``block`` (the whole answer becomes a polite
                   fixed text), ``replace`` (the word is masked: ＊＊ / ***) or ``allow``.
``personal data``  phone numbers, e-mail addresses, Chinese ID-card numbers (date and checksum checked) and
                   bank-card numbers (Luhn, card prefixes) are masked keeping their shape (138****5678)
                   unless the customer gave the value in this conversation or the operator allow-listed
                   it. Numbers labelled as order, tracking or ticket numbers are never touched, and codes
                   glued to letters (KF20251103001, SF1234567890123) never match at all.
``prompt leak``    an answer that quotes a long verbatim span of the system prompt or the tool definitions
                   (a run of consecutive shingles of their normalised text) is blocked.

:class:`StreamModerator` applies the same checks to a streamed answer. It holds back only what a match
could still need: the last few characters (as many as the longest lexicon phrase) and a trailing run of
digits or e-mail characters, so a word or number split across chunks is caught before any of it is shown.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import ahocorasick  # type: ignore[import-not-found]  # the C extension ships no type stubs

from core.errors import ConfigError
from core.guards.normalize import clean_text, homoglyph_table, load_homoglyph_file
from core.guards.rules import (
    HOMOGLYPH_FILE,
    POLICY_FILE,
    LexiconEntry,
    add_phrase,
    data_files,
    read_lexicon,
    read_yaml_mapping,
)
from core.messages import Language
from core.texts import text as fixed_text

OutputAction = Literal["allow", "replace", "block"]
OUTPUT_ACTIONS: tuple[OutputAction, ...] = ("allow", "replace", "block")
DEFAULT_DATA_DIR = Path(str(resources.files("core.guards.data") / "output"))

PROMPT_LEAK = "prompt_leak"
PII_PHONE = "pii_phone"
PII_EMAIL = "pii_email"
PII_ID_CARD = "pii_id_card"
PII_BANK_CARD = "pii_bank_card"

# Shingle length (normalised characters) for the prompt-leak check; a run of consecutive shared shingles
# is a verbatim quote. Chinese characters weigh 2 so the threshold means ~18 hanzi or ~36 letters/digits.
SHINGLE = 8
LEAK_MIN_WEIGHT = 36
_CACHE_LIMIT = 50_000

# ------------------------------------------------------------------------------------ personal data
_D = "[0-9０-９]"
_GLUED = "0-9A-Za-z０-９Ａ-Ｚａ-ｚ"
_NB = f"(?<![{_GLUED}])"  # not glued to a preceding letter or digit (KF2025..., SF1234...)
_NA = f"(?![{_GLUED}])"
_CN_MOBILE = re.compile(f"{_NB}(?P<cc>(?:\\+|00)?86[ -]?)?1[3-9]{_D}(?:[ -]?{_D}{{4}}){{2}}{_NA}")
_INTL_PHONE = re.compile(f"(?<![{_GLUED}+])\\+{_D}{{1,3}}(?:[ .-]?{_D}{{1,5}}){{2,5}}{_NA}")
_ID_CARD = re.compile(f"{_NB}{_D}{{17}}[0-9０-９Xxｘ]{_NA}")
_BANK_CARD = re.compile(
    f"{_NB}(?:{_D}{{13,19}}"
    f"|{_D}{{4}}(?P<s1>[ -]){_D}{{4}}(?:(?P=s1){_D}{{4}}){{1,2}}(?:(?P=s1){_D}{{1,3}})?"
    f"|{_D}{{4}}(?P<s2>[ -]){_D}{{6}}(?P=s2){_D}{{4,5}}){_NA}"
)
_NUMBER_RUN = re.compile(f"\\+?{_D}(?:[ .-]?{_D}){{7,}}")
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9-])"
)
# A number right after one of these labels is an order/tracking/ticket number, never personal data.
_NUMBER_LABEL = re.compile(
    r"(?:订单|单号|运单|快递|物流|包裹|编号|工单|发票|流水|(?<![a-z])(?:order|tracking|waybill|shipment|"
    r"parcel|ticket|invoice|reference|ref))\s*(?:号码|号|编号|number|no\.?|id|code)?\s*[:：#]?\s*(?:是|为|is)?\s*$|#\s*$",
    re.IGNORECASE,
)
_ASCII_DIGITS = str.maketrans("０１２３４５６７８９Ｘｘ", "0123456789xx")
# Characters a phone number, card number or e-mail address is made of: the trailing run of them in a
# stream may still grow into (or out of) a match, so it is held back.
_PII_GLUE = frozenset(
    "0123456789０１２３４５６７８９ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz._%+-@"
)
_PII_GAP = frozenset(" -")
_PII_TAIL_MAX = 64
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10x98765432"


def _is_cjk(ch: str) -> bool:
    return "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"


def _in_word(ch: str) -> bool:
    """Whether ``ch`` continues a Latin word (a Chinese character or a space ends it)."""
    return ch.isalnum() and not _is_cjk(ch)


def _digits(value: str) -> str:
    """The ASCII digits (and ID-card check letter ``x``) of ``value``."""
    return "".join(ch for ch in value.translate(_ASCII_DIGITS) if ch.isdigit() or ch == "x")


def valid_id_card(number: str) -> bool:
    """Whether ``number`` is a well-formed 18-digit Chinese resident ID (region, birth date, checksum)."""
    digits = number.translate(_ASCII_DIGITS).lower()
    if len(digits) != 18 or not digits[:17].isdigit() or digits[0] not in "12345678":
        return False
    try:
        born = date(int(digits[6:10]), int(digits[10:12]), int(digits[12:14]))
    except ValueError:
        return False
    if born.year < 1900:
        return False
    total = sum(int(d) * w for d, w in zip(digits[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == digits[17]


def luhn_valid(digits: str) -> bool:
    """Whether the digit string passes the Luhn check used by payment cards."""
    total = 0
    for index, ch in enumerate(reversed(digits)):
        value = int(ch)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card_prefix(digits: str) -> bool:
    # UnionPay/Discover 6, Visa 4, Mastercard 51-55 and 22-27, Amex/JCB/Diners 3x.
    return digits[0] in "346" or digits[:2] in {
        "51",
        "52",
        "53",
        "54",
        "55",
        "22",
        "23",
        "24",
        "25",
        "26",
        "27",
    }


def _phone_key(digits: str) -> str:
    # "+86 138..." and "138..." are the same number.
    if len(digits) == 13 and digits.startswith("86"):
        return digits[2:]
    if len(digits) == 15 and digits.startswith("0086"):
        return digits[4:]
    return digits


def _mask_digits(value: str, head: int, tail: int) -> str:
    """``value`` with every digit but the first ``head`` and last ``tail`` replaced by ``*``."""
    total = sum(ch.isdigit() or ch in "Xxｘ" for ch in value)
    out: list[str] = []
    seen = 0
    for ch in value:
        if ch.isdigit() or ch in "Xxｘ":
            seen += 1
            out.append(ch if seen <= head or seen > total - tail else "*")
        else:
            out.append(ch)
    return "".join(out)


def _mask_email(value: str) -> str:
    local, _, domain = value.partition("@")
    return f"{local[:1]}***@{domain}"


@dataclass(frozen=True, slots=True)
class _Personal:
    """One piece of personal data found in a text."""

    start: int
    end: int
    category: str
    key: str
    masked: str


def find_personal_data(text: str, start: int = 0) -> list[_Personal]:
    """Phone numbers, e-mail addresses, ID-card and bank-card numbers in ``text`` (from ``start``)."""
    found: list[_Personal] = []

    def free(a: int, b: int) -> bool:
        return all(b <= p.start or a >= p.end for p in found)

    def labelled(a: int) -> bool:
        return _NUMBER_LABEL.search(text, max(0, a - 24), a) is not None

    # The specific patterns only run around runs of 8+ digits: most answers have none or one or two.
    for run in _NUMBER_RUN.finditer(text, start):
        lo, hi = run.start(), min(len(text), run.end() + 1)  # one more character for the lookahead
        for m in _ID_CARD.finditer(text, lo, hi):
            if valid_id_card(m.group()) and not labelled(m.start()):
                masked = _mask_digits(m.group(), 3, 4)
                found.append(_Personal(m.start(), m.end(), PII_ID_CARD, _digits(m.group()), masked))
        for m in _CN_MOBILE.finditer(text, lo, hi):
            if free(m.start(), m.end()) and not labelled(m.start()):
                head = 3 + len(_digits(m.group("cc") or ""))
                key = _phone_key(_digits(m.group()))
                found.append(_Personal(m.start(), m.end(), PII_PHONE, key, _mask_digits(m.group(), head, 4)))
        for m in _INTL_PHONE.finditer(text, lo, hi):
            digits = _digits(m.group())
            if 8 <= len(digits) <= 15 and free(m.start(), m.end()) and not labelled(m.start()):
                masked = _mask_digits(m.group(), 3, 4 if len(digits) >= 10 else 2)
                found.append(_Personal(m.start(), m.end(), PII_PHONE, _phone_key(digits), masked))
        for m in _BANK_CARD.finditer(text, lo, hi):
            digits = _digits(m.group())
            if (
                13 <= len(digits) <= 19
                and _card_prefix(digits)
                and luhn_valid(digits)
                and free(m.start(), m.end())
                and not labelled(m.start())
            ):
                masked = _mask_digits(m.group(), 4, 4)
                found.append(_Personal(m.start(), m.end(), PII_BANK_CARD, digits, masked))
    if "@" in text:
        for m in _EMAIL.finditer(text, start):
            if free(m.start(), m.end()):
                key = m.group().casefold()
                found.append(_Personal(m.start(), m.end(), PII_EMAIL, key, _mask_email(m.group())))
    return found


def personal_values(text: str) -> set[str]:
    """The personal-data values (phones, e-mails, ID and card numbers) that appear in ``text``.

    For the engine: values found in the results of this customer's own tool calls (their order's
    courier phone, say) may be passed on as ``customer_values`` so they are not masked.
    """
    return {text[p.start : p.end] for p in find_personal_data(text)}


def pinned_values(pinned: Mapping[str, Any]) -> set[str]:
    """Every string in a conversation's pinned facts (phone, e-mail, order ids, notes ...)."""
    values: set[str] = set()
    stack: list[Any] = [pinned]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            values.add(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
    return values


def _value_keys(values: Iterable[str]) -> set[str]:
    """Comparison keys for values never to mask: the value itself, its digits, and any data inside it."""
    keys: set[str] = set()
    for value in values:
        value = value.strip()
        if not value:
            continue
        keys.add(value.casefold())
        digits = _digits(value)
        if len(digits) >= 6:
            keys.update({digits, _phone_key(digits)})
        keys.update(p.key for p in find_personal_data(value))
    return keys


# ------------------------------------------------------------------------------------ policy
@dataclass(slots=True)
class OutputPolicy:
    """Action per category, plus values and e-mail domains that are never masked."""

    default_action: OutputAction = "block"
    actions: dict[str, OutputAction] = field(default_factory=dict)
    allow_values: set[str] = field(default_factory=set)
    allow_email_domains: set[str] = field(default_factory=set)

    def action_for(self, category: str) -> OutputAction:
        """The configured action for ``category`` (the default action for unknown categories)."""
        return self.actions.get(category, self.default_action)

    def merge(self, document: Mapping[str, Any], *, source: Path) -> None:
        """Apply a ``policy.yaml`` document on top of this policy."""
        if document.get("default_action") is not None:
            self.default_action = _output_action(document["default_action"], source)
        for category, action in (document.get("categories") or {}).items():
            self.actions[str(category)] = _output_action(action, source)
        if self.actions.get(PROMPT_LEAK) == "replace":
            raise ConfigError(f"{source}: {PROMPT_LEAK} can only be block or allow")
        self.allow_values.update(str(v) for v in document.get("allow_values") or ())
        self.allow_email_domains.update(
            str(d).casefold().lstrip("@") for d in document.get("allow_email_domains") or ()
        )


def _output_action(value: object, source: Path) -> OutputAction:
    for action in OUTPUT_ACTIONS:
        if value == action:
            return action
    raise ConfigError(f"{source}: unknown action {value!r} (expected one of {', '.join(OUTPUT_ACTIONS)})")


def read_output_policy(path: Path, policy: OutputPolicy) -> None:
    """Merge ``path`` (an output ``policy.yaml``) into ``policy``."""
    policy.merge(read_yaml_mapping(path), source=path)


# ------------------------------------------------------------------------------------ normalised views
class _Folder(dict[int, str]):
    """Character → its canonical letters/digits (the input guard's ``clean_text``), cached.

    A separator (space, punctuation) folds to one space, an invisible character to nothing. Usable as a
    ``str.translate`` table, so the common no-match case never leaves C code.
    """

    def __init__(self, homoglyphs: dict[int, str]) -> None:
        super().__init__()
        self._homoglyphs = homoglyphs

    def __missing__(self, key: int) -> str:
        ch = chr(key)
        clean = clean_text(ch, homoglyphs=self._homoglyphs)
        letters = "".join(c for c in clean if c.isalnum())
        folded = letters or (" " if clean or ch.isspace() else "")
        if len(self) > _CACHE_LIMIT:
            self.clear()
        self[key] = folded
        return folded


_SPACE_RUN = re.compile(" {2,}")


@dataclass(frozen=True, slots=True)
class _Views:
    """``words`` (letters/digits, one space per separator run) and ``compact`` (no spaces), each with the
    index in the raw text of every character."""

    words: str
    word_index: list[int]
    compact: str
    compact_index: list[int]


def _mapped_views(text: str, lo: int, fold: _Folder) -> _Views:
    words: list[str] = []
    word_index: list[int] = []
    compact: list[str] = []
    compact_index: list[int] = []
    for i in range(lo, len(text)):
        folded = fold[ord(text[i])]
        if folded == " ":
            if words and words[-1] != " ":
                words.append(" ")
                word_index.append(i)
            continue
        for c in folded:
            words.append(c)
            word_index.append(i)
            compact.append(c)
            compact_index.append(i)
    return _Views("".join(words), word_index, "".join(compact), compact_index)


# ------------------------------------------------------------------------------------ matches
@dataclass(frozen=True, slots=True)
class _Span:
    """A stretch of the raw answer a rule fired on. ``pending``: it may still change as text arrives."""

    start: int
    end: int
    category: str
    rule: str
    action: OutputAction
    replacement: str
    pending: bool = False


@dataclass(frozen=True, slots=True)
class _Phrase:
    entry: LexiconEntry
    length: int
    action: OutputAction
    mask: str


class _Lexicon:
    """Latin phrases on the ``words`` view (whole words), Chinese phrases on the ``compact`` view."""

    def __init__(self, entries: Iterable[tuple[LexiconEntry, OutputAction]], fold: _Folder) -> None:
        self._fold = fold
        self._words = ahocorasick.Automaton()
        self._compact = ahocorasick.Automaton()
        self.longest_words = 0
        self.longest_compact = 0
        for entry, action in entries:
            words = _SPACE_RUN.sub(" ", entry.phrase.translate(fold)).strip()
            compact = words.replace(" ", "")
            if not compact:
                continue
            if any(_is_cjk(c) for c in compact):
                phrase = _Phrase(entry, len(compact), action, "＊" * len(compact))
                add_phrase(self._compact, compact, phrase)
                self.longest_compact = max(self.longest_compact, len(compact))
            else:
                phrase = _Phrase(entry, len(words), action, "*" * len(compact))
                add_phrase(self._words, words, phrase)
                self.longest_words = max(self.longest_words, len(words))
        for automaton in (self._words, self._compact):
            if len(automaton):
                automaton.make_automaton()

    def _any(self, words: str, compact: str) -> bool:
        if len(self._compact):
            for _ in self._compact.iter(compact):
                return True
        if len(self._words):
            for _ in self._words.iter(words):
                return True
        return False

    def find(self, text: str, lo: int, *, final: bool) -> list[_Span]:
        """Phrases in ``text[lo:]`` (one character before ``lo`` is read for the word boundary)."""
        ctx = lo
        while ctx > 0:
            ctx -= 1
            if self._fold[ord(text[ctx])]:  # skip invisible characters back to a real neighbour
                break
        quick = _SPACE_RUN.sub(" ", text[ctx:].translate(self._fold))
        if not self._any(quick, quick.replace(" ", "")):
            return []
        views = _mapped_views(text, ctx, self._fold)
        spans: list[_Span] = []
        if len(self._words):
            words = views.words
            for end, phrases in self._words.iter(words):
                phrase: _Phrase
                for phrase in phrases:
                    start = end - phrase.length + 1
                    if start > 0 and _in_word(words[start - 1]):
                        continue
                    if end + 1 < len(words):
                        if _in_word(words[end + 1]):
                            continue
                        pending = False
                    else:
                        pending = not final
                    spans.append(self._span(phrase, views.word_index, start, end, pending))
        if len(self._compact):
            for end, phrases in self._compact.iter(views.compact):
                for phrase in phrases:
                    start = end - phrase.length + 1
                    spans.append(self._span(phrase, views.compact_index, start, end, False))
        return [s for s in spans if s.start >= lo]

    @staticmethod
    def _span(phrase: _Phrase, index: list[int], start: int, end: int, pending: bool) -> _Span:
        entry = phrase.entry
        return _Span(
            index[start], index[end] + 1, entry.category, entry.rule, phrase.action, phrase.mask, pending
        )


class _LeakTracker:
    """Finds a verbatim quote of the protected texts in a growing normalised answer."""

    def __init__(self, automaton: ahocorasick.Automaton, *, min_weight: int) -> None:
        self._automaton = automaton
        self._min_weight = min_weight
        self._text = ""
        self._run_first = -2
        self._last_end = -2
        self.rule: str | None = None

    def feed(self, compact: str) -> bool:
        """Add normalised characters; True once a leak is found."""
        if self.rule is not None:
            return True
        if not compact or not len(self._automaton):
            return False
        offset = max(0, len(self._text) - SHINGLE + 1)
        self._text += compact
        for end, kind in self._automaton.iter(self._text, offset):
            if kind == "canary":
                self.rule = f"{PROMPT_LEAK}.canary"
                return True
            if end != self._last_end + 1:
                self._run_first = end
            self._last_end = end
            first = self._run_first - SHINGLE + 1
            if end + 1 - first >= self._min_weight // 2:
                weight = sum(2 if _is_cjk(c) else 1 for c in self._text[first : end + 1])
                if weight >= self._min_weight:
                    self.rule = f"{PROMPT_LEAK}.verbatim"
                    return True
        return False


# ------------------------------------------------------------------------------------ results
@dataclass(frozen=True, slots=True)
class ModerationResult:
    """What the customer may see.

    ``text`` is the answer to show: unchanged (allow), masked (replace) or the polite fixed text (block).
    ``categories``/``rules`` name what fired, in order; ``masked_count`` counts masked words and values.
    ``blocked_after_emit`` (streaming only): part of the answer was already shown before it was blocked,
    so the platform must replace the streamed message with ``text``.
    """

    text: str
    action: OutputAction
    categories: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    masked_count: int = 0
    blocked_after_emit: bool = False


class OutputModerator:
    """Moderates model answers: lexicon, personal data of third parties and system-prompt leaks.

    Build it with :meth:`load`; one instance serves every conversation (only its character cache grows).
    """

    def __init__(
        self,
        *,
        lexicon: Sequence[LexiconEntry],
        policy: OutputPolicy,
        system_prompt: str,
        tool_texts: Sequence[str] = (),
        canaries: Sequence[str] = (),
        homoglyphs: dict[int, str] | None = None,
        leak_min_weight: int = LEAK_MIN_WEIGHT,
    ) -> None:
        self._policy = policy
        self._fold = _Folder(homoglyphs if homoglyphs is not None else homoglyph_table())
        active = [(e, policy.action_for(e.category)) for e in lexicon]
        self._lexicon = _Lexicon([(e, a) for e, a in active if a != "allow"], self._fold)
        self._pii_actions = {
            c: policy.action_for(c) for c in (PII_PHONE, PII_EMAIL, PII_ID_CARD, PII_BANK_CARD)
        }
        self._pii_on = any(a != "allow" for a in self._pii_actions.values())
        self._allowed = frozenset(_value_keys(policy.allow_values))
        self._allowed_domains = tuple(policy.allow_email_domains)
        self._leak_min_weight = leak_min_weight
        self._leaks = ahocorasick.Automaton()
        if policy.action_for(PROMPT_LEAK) != "allow":
            self._add_protected([system_prompt, *tool_texts], canaries)
        # A match may include characters not yet streamed: hold back as many as the longest phrase
        # (plus one for the word boundary after a Latin phrase).
        self._hold_words = self._lexicon.longest_words + 1 if self._lexicon.longest_words else 0
        self._hold_compact = max(self._lexicon.longest_compact - 1, 0)

    def _add_protected(self, texts: Sequence[str], canaries: Sequence[str]) -> None:
        for protected in texts:
            compact = protected.translate(self._fold).replace(" ", "")
            for i in range(len(compact) - SHINGLE + 1):
                self._leaks.add_word(compact[i : i + SHINGLE], "shingle")
        for canary in canaries:
            compact = canary.translate(self._fold).replace(" ", "")
            if len(compact) < 6:
                raise ConfigError(f"canary {canary!r} is too short (at least 6 letters or digits)")
            self._leaks.add_word(compact, "canary")
        if len(self._leaks):
            self._leaks.make_automaton()

    @classmethod
    def load(
        cls,
        data_dir: Path | None = None,
        *,
        extra_dirs: Sequence[Path] = (),
        system_prompt: str,
        tool_texts: Sequence[str] = (),
        canaries: Sequence[str] = (),
        leak_min_weight: int = LEAK_MIN_WEIGHT,
    ) -> OutputModerator:
        """Load lexicons (``*.txt``) and ``policy.yaml`` from ``data_dir`` (the shipped
        ``core/guards/data/output`` by default) and then each of ``extra_dirs``.

        Lexicons add up; a later ``policy.yaml`` overrides single categories and adds allow-listed
        values; a ``homoglyphs.txt`` adds look-alike folds. ``system_prompt`` and ``tool_texts`` (tool
        names, descriptions and schemas as sent to the model) are what must never be quoted back: a
        verbatim run of ``leak_min_weight`` normalised characters (a Chinese character counts 2), or any
        of ``canaries``, blocks the answer.
        """
        lexicon: list[LexiconEntry] = []
        policy = OutputPolicy()
        homoglyphs = dict(homoglyph_table())
        for path in data_files([data_dir or DEFAULT_DATA_DIR, *extra_dirs]):
            if path.name == HOMOGLYPH_FILE:
                homoglyphs.update(load_homoglyph_file(path))
            elif path.name == POLICY_FILE:
                read_output_policy(path, policy)
            elif path.suffix == ".txt":
                lexicon.extend(read_lexicon(path))
            else:
                raise ConfigError(f"{path}: the output moderator reads only *.txt lexicons and policy.yaml")
        return cls(
            lexicon=lexicon,
            policy=policy,
            system_prompt=system_prompt,
            tool_texts=tool_texts,
            canaries=canaries,
            homoglyphs=homoglyphs,
            leak_min_weight=leak_min_weight,
        )

    # ------------------------------------------------------------------ public API
    def moderate(
        self,
        text: str,
        *,
        customer_values: Collection[str] | Mapping[str, Any] = (),
        language: Language = "zh",
    ) -> ModerationResult:
        """Moderate a complete answer.

        ``customer_values`` are the customer's own details, never masked: strings, or the conversation's
        pinned facts as they are (``{"phone": ..., "email": ..., "order_ids": [...]}``).
        """
        stream = self.stream(customer_values=customer_values, language=language)
        stream.append(text)
        return stream.finish()

    def stream(
        self, *, customer_values: Collection[str] | Mapping[str, Any] = (), language: Language = "zh"
    ) -> StreamModerator:
        """A moderator for one streamed answer (see :class:`StreamModerator`)."""
        if isinstance(customer_values, Mapping):
            customer_values = pinned_values(customer_values)
        allowed = self._allowed | _value_keys(customer_values) if customer_values else self._allowed
        return StreamModerator(self, allowed=allowed, language=language)

    # ------------------------------------------------------------------ internals used by the stream
    def _leak_tracker(self) -> _LeakTracker:
        return _LeakTracker(self._leaks, min_weight=self._leak_min_weight)

    def _compact(self, text: str) -> str:
        return text.translate(self._fold).replace(" ", "")

    def _pii_tail(self, text: str, lo: int) -> int:
        """Start of the trailing run of digits/e-mail characters (it may still become a match)."""
        i = len(text)
        floor = max(lo, i - _PII_TAIL_MAX)
        while i > floor:
            ch = text[i - 1]
            if ch in _PII_GLUE:
                i -= 1
            elif (
                ch in _PII_GAP
                and i - 2 >= floor
                and text[i - 2].isdigit()
                and (i == len(text) or text[i].isdigit())
            ):
                i -= 1  # "138 1234 5678": a single gap between digit groups
            else:
                break
        return i

    def _lexicon_hold(self, text: str, lo: int) -> int:
        """Index from which text is held back for phrases that may still be completing."""
        need_words, need_compact = self._hold_words, self._hold_compact
        fold = self._fold
        i = len(text)
        separator = False
        while i > lo and (need_words > 0 or need_compact > 0):
            i -= 1
            folded = fold[ord(text[i])]
            if folded == " ":
                if not separator:
                    need_words -= 1
                separator = True
            elif folded:
                if "\u3400" <= folded[0] <= "\u9fff":
                    need_words = 0  # a Latin phrase never spans a Chinese character
                need_words -= len(folded)
                need_compact -= len(folded)
                separator = False
        return i

    def _detect(self, text: str, lo: int, allowed: frozenset[str], *, final: bool, tail: int) -> list[_Span]:
        """Every match in ``text[lo:]``; personal data reaching past ``tail`` may still grow (pending)."""
        spans = self._lexicon.find(text, lo, final=final)
        if self._pii_on:
            for found in find_personal_data(text, lo):
                action = self._pii_actions[found.category]
                if action == "allow" or found.key in allowed or self._allowed_domain(found):
                    continue
                rule = f"pii.{found.category.removeprefix('pii_')}"
                spans.append(
                    _Span(
                        found.start, found.end, found.category, rule, action, found.masked, found.end > tail
                    )
                )
        return spans

    def _allowed_domain(self, found: _Personal) -> bool:
        if found.category != PII_EMAIL:
            return False
        domain = found.key.rpartition("@")[2]
        return any(domain == d or domain.endswith("." + d) for d in self._allowed_domains)


def _render(text: str, start: int, end: int, spans: list[_Span]) -> str:
    """``text[start:end]`` with each span replaced (overlapping spans are masked as one)."""
    out: list[str] = []
    pos = start
    index = 0
    spans = sorted(spans, key=lambda s: (s.start, -s.end))
    while index < len(spans):
        group = [spans[index]]
        group_end = group[0].end
        index += 1
        while index < len(spans) and spans[index].start < group_end:
            group.append(spans[index])
            group_end = max(group_end, spans[index].end)
            index += 1
        first = group[0]
        out.append(text[pos : first.start])
        if len(group) == 1:
            out.append(first.replacement)
        else:
            raw = text[first.start : group_end]
            out.append("".join(("＊" if _is_cjk(c) else "*") if c.isalnum() else c for c in raw))
        pos = group_end
    out.append(text[pos:end])
    return "".join(out)


class StreamModerator:
    """Moderates one answer as it streams: :meth:`feed` each delta and show what it returns, then call
    :meth:`finish` for the final text.

    Text is released only once no match can still cover it, so a word or a number split across chunks is
    masked or blocked before any part of it is shown. Nothing is blocked or masked differently from
    :meth:`OutputModerator.moderate` on the whole text: when the answer is not blocked,
    ``emitted + rest == finish().text``.
    """

    def __init__(self, moderator: OutputModerator, *, allowed: frozenset[str], language: Language) -> None:
        self._moderator = moderator
        self._allowed = allowed
        self._language = language
        self._text = ""
        self._committed = 0
        self._emitted: list[str] = []
        self._applied: list[_Span] = []
        self._leak = moderator._leak_tracker()
        self._blocked: _Span | None = None
        self._result: ModerationResult | None = None

    @property
    def emitted(self) -> str:
        """Everything :meth:`feed` has released so far."""
        return "".join(self._emitted)

    @property
    def blocked(self) -> bool:
        """Whether the answer has been blocked (the rest of the stream is swallowed)."""
        return self._blocked is not None

    def append(self, delta: str) -> None:
        """Add ``delta`` without releasing anything (used for whole answers)."""
        self._check_open()
        self._text += delta
        if self._blocked is None and self._leak.feed(self._moderator._compact(delta)):
            self._block(self._leak.rule or PROMPT_LEAK, PROMPT_LEAK)

    def feed(self, delta: str) -> str:
        """Add the next piece of the answer; returns the text that is safe to show now (maybe "")."""
        self.append(delta)
        if self._blocked is not None or not delta:
            return ""
        return self._advance(final=False)

    def finish(self) -> ModerationResult:
        """End of the answer: the final text and what was done to it (idempotent)."""
        if self._result is not None:
            return self._result
        if self._blocked is None:
            self._advance(final=True)
        categories = tuple(dict.fromkeys(s.category for s in self._applied))
        rules = tuple(dict.fromkeys(s.rule for s in self._applied))
        masked = sum(s.action == "replace" for s in self._applied)
        if self._blocked is not None:
            self._result = ModerationResult(
                text=fixed_text("output_blocked", self._language),
                action="block",
                categories=tuple(dict.fromkeys((self._blocked.category, *categories))),
                rules=tuple(dict.fromkeys((self._blocked.rule, *rules))),
                masked_count=masked,
                blocked_after_emit=any(self._emitted),
            )
        else:
            self._result = ModerationResult(
                text=self.emitted,
                action="replace" if masked else "allow",
                categories=categories,
                rules=rules,
                masked_count=masked,
            )
        return self._result

    def _check_open(self) -> None:
        if self._result is not None:
            raise RuntimeError("this answer's moderation has already finished")

    def _block(self, rule: str, category: str) -> None:
        self._blocked = _Span(0, 0, category, rule, "block", "")

    def _advance(self, *, final: bool) -> str:
        moderator, text, lo = self._moderator, self._text, self._committed
        tail = len(text) if final or not moderator._pii_on else moderator._pii_tail(text, lo)
        spans = moderator._detect(text, lo, self._allowed, final=final, tail=tail)
        for span in spans:
            if span.action == "block" and not span.pending:
                self._blocked = span
                return ""
        cut = tail if final else min(tail, moderator._lexicon_hold(text, lo))
        moved = True
        while moved:  # never release part of a match
            moved = False
            for span in spans:
                if span.start < cut < span.end:
                    cut, moved = span.start, True
        if cut <= lo:
            return ""
        released = [s for s in spans if s.end <= cut and s.action == "replace"]
        piece = _render(text, lo, cut, released)
        self._applied.extend(sorted(released, key=lambda s: s.start))
        self._emitted.append(piece)
        self._committed = cut
        return piece


__all__ = [
    "ModerationResult",
    "OutputModerator",
    "OutputPolicy",
    "StreamModerator",
    "find_personal_data",
    "luhn_valid",
    "personal_values",
    "pinned_values",
    "valid_id_card",
]
