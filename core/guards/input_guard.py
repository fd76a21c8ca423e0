"""The input guard: decides what happens to a customer's message before the model sees it.

Matching runs on normalised views of the text (see :mod:`core.guards.normalize`): lexicon phrases through
one Aho-Corasick automaton per view, then compiled regex rules, then weak-signal rules (several harmless
phrases that together give a role-play jailbreak away, see :mod:`core.guards.signals`). Payloads hidden
in base64, hex, percent-encoding, rot13, leetspeak or backwards text are decoded and matched the same way
(see :mod:`core.guards.decoders`). Every decision names the rule and category that caused it, so the
engine can log it; what happens per category comes from ``policy.yaml``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import ahocorasick  # type: ignore[import-not-found]  # the C extension ships no type stubs

from core.guards.control_tokens import neutralize_control_tokens
from core.guards.decoders import hidden_payloads
from core.guards.normalize import (
    NormalizedText,
    has_hidden_characters,
    homoglyph_table,
    load_homoglyph_file,
    normalize,
    strip_invisible,
)
from core.guards.rules import (
    HOMOGLYPH_FILE,
    POLICY_FILE,
    Action,
    LexiconEntry,
    PatternRule,
    Policy,
    SignalRule,
    add_phrase,
    data_files,
    read_lexicon,
    read_patterns,
    read_policy,
    read_signals,
)
from core.guards.signals import SignalIndex
from core.language import detect_language

DEFAULT_DATA_DIR = Path(str(resources.files("core.guards") / "data"))
HIDDEN_TEXT_RULE = "builtin.hidden_characters"
HIDDEN_TEXT_CATEGORY = "hidden_text"

_SEVERITY: dict[Action, int] = {"allow": 0, "flag": 1, "strip": 2, "block": 3}
_LATIN_LETTER = re.compile(r"[a-z]")
_LATIN_ALNUM = re.compile(r"[a-z0-9]")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
# A phrase this long (without spaces) is specific enough to match inside run-together text.
_COMPACT_MIN = 16
_SENTENCE = re.compile(r"[^。！？!?；;\n.]+[。！？!?；;\n.]*|[。！？!?；;\n.]+")


@dataclass(frozen=True, slots=True)
class GuardMatch:
    """One rule that fired: its id, its category and the action the policy gives that category."""

    rule: str
    category: str
    action: Action


@dataclass(frozen=True, slots=True)
class GuardDecision:
    """What to do with a message.

    ``text`` is what to pass on: the original (control tokens neutralised) for allow/flag, the cleaned
    text for strip. For block, ``text`` is the neutralised original for logging only, and ``reply`` is
    the polite answer to send instead of calling the model.
    """

    action: Action
    category: str | None
    rule: str | None
    text: str
    reply: str | None = None
    matches: tuple[GuardMatch, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class _Phrase:
    entry: LexiconEntry
    length: int
    bounded: bool


class _Lexicon:
    """Aho-Corasick automatons over the ``words`` view (whole words) and the ``compact`` view."""

    def __init__(self, entries: Iterable[LexiconEntry], *, homoglyphs: dict[int, str]) -> None:
        self._words = ahocorasick.Automaton()
        self._compact = ahocorasick.Automaton()
        for entry in entries:
            norm = normalize(entry.phrase, homoglyphs=homoglyphs)
            if not norm.compact:
                continue
            if _CJK.search(norm.compact):
                add_phrase(self._compact, norm.compact, _Phrase(entry, len(norm.compact), bounded=False))
                continue
            add_phrase(self._words, norm.words, _Phrase(entry, len(norm.words), bounded=True))
            # Letter-spaced input ("s y s t e m p r o m p t") collapses to the compact spelling.
            add_phrase(self._words, norm.compact, _Phrase(entry, len(norm.compact), bounded=True))
            if len(norm.compact) >= _COMPACT_MIN:
                add_phrase(self._compact, norm.compact, _Phrase(entry, len(norm.compact), bounded=False))
        for automaton in (self._words, self._compact):
            if len(automaton):
                automaton.make_automaton()

    def first_match(self, words: str, compact: str) -> LexiconEntry | None:
        """The first lexicon entry found in either view, or None."""
        if len(self._words):
            for end, phrases in self._words.iter(words):
                phrase: _Phrase
                for phrase in phrases:
                    start = end - phrase.length + 1
                    before = words[start - 1] if start > 0 else " "
                    after = words[end + 1] if end + 1 < len(words) else " "
                    if not (_LATIN_ALNUM.match(before) or _LATIN_ALNUM.match(after)):
                        return phrase.entry
        if len(self._compact):
            for _end, phrases in self._compact.iter(compact):
                first: _Phrase = phrases[0]
                return first.entry
        return None


class InputGuard:
    """Checks customer messages for prompt injection and jailbreak attempts.

    Build it with :meth:`load` (shipped data plus operator data dirs) or directly from parsed rules.
    """

    def __init__(
        self,
        *,
        lexicon: Sequence[LexiconEntry],
        patterns: Sequence[PatternRule],
        policy: Policy,
        signals: Sequence[SignalRule] = (),
        homoglyphs: dict[int, str] | None = None,
    ) -> None:
        self._homoglyphs = homoglyphs if homoglyphs is not None else homoglyph_table()
        self._lexicon = _Lexicon(lexicon, homoglyphs=self._homoglyphs)
        self._signals = SignalIndex(signals, homoglyphs=self._homoglyphs)
        # A rule marked with a script only runs on messages written (partly) in it; the four possible
        # mixes are worked out once, so a Chinese message never pays for the English rules.
        self._patterns = {
            scripts: {
                view: tuple(
                    p for p in patterns if p.view == view and (p.script is None or p.script in scripts)
                )
                for view in ("words", "clean", "raw")
            }
            for scripts in (
                frozenset(),
                frozenset({"han"}),
                frozenset({"latin"}),
                frozenset({"han", "latin"}),
            )
        }
        self._policy = policy

    @classmethod
    def load(cls, data_dir: Path | None = None, *, extra_dirs: Sequence[Path] = ()) -> InputGuard:
        """Load rules from ``data_dir`` (the shipped data by default) and then each of ``extra_dirs``.

        Lexicons, patterns and signal rules add up; a later ``policy.yaml`` overrides single categories
        and replies; a later ``homoglyphs.txt`` adds folds.
        """
        directories = [data_dir or DEFAULT_DATA_DIR, *extra_dirs]
        lexicon: list[LexiconEntry] = []
        patterns: list[PatternRule] = []
        signals: list[SignalRule] = []
        fragments: dict[str, str] = {}
        policy = Policy()
        homoglyphs = dict(homoglyph_table())
        for path in data_files(directories):
            if path.name == HOMOGLYPH_FILE:
                homoglyphs.update(load_homoglyph_file(path))
            elif path.name == POLICY_FILE:
                read_policy(path, policy)
            elif path.suffix == ".txt":
                lexicon.extend(read_lexicon(path))
            else:
                patterns.extend(read_patterns(path, fragments=fragments))
                signals.extend(read_signals(path))
        return cls(lexicon=lexicon, patterns=patterns, policy=policy, signals=signals, homoglyphs=homoglyphs)

    # ------------------------------------------------------------------ matching
    def _match_views(self, raw: str, norm: NormalizedText) -> GuardMatch | None:
        scripts = frozenset(
            name
            for name, present in (
                ("han", _CJK.search(norm.words)),
                ("latin", _LATIN_LETTER.search(norm.words)),
            )
            if present
        )
        patterns = self._patterns[scripts]
        # Structural rules (template markers, tool JSON) run first so they name the category when a
        # faked system turn also contains override wording.
        for rule in (*patterns["raw"], *patterns["clean"]):
            if rule.matches(raw if rule.view == "raw" else norm.clean):
                return self._match(rule.rule, rule.category)
        entry = self._lexicon.first_match(norm.words, norm.compact)
        if entry is not None:
            return self._match(entry.rule, entry.category)
        for rule in patterns["words"]:
            if rule.matches(norm.words):
                return self._match(rule.rule, rule.category)
        signal = self._signals.first_firing(norm.words, norm.compact)
        if signal is not None:
            return self._match(signal.rule, signal.category)
        return None

    def _match(self, rule: str, category: str) -> GuardMatch:
        return GuardMatch(rule=rule, category=category, action=self._policy.action_for(category))

    def _scan(self, text: str, *, depth: int = 0) -> list[GuardMatch]:
        matches: list[GuardMatch] = []
        if has_hidden_characters(text):
            matches.append(self._match(HIDDEN_TEXT_RULE, HIDDEN_TEXT_CATEGORY))
        norm = normalize(text, homoglyphs=self._homoglyphs)
        found = self._match_views(text, norm)
        if found is not None:
            matches.append(found)
            return matches
        if depth > 0:
            return matches
        for decoder, decoded in hidden_payloads(text, clean=norm.clean, words=norm.words):
            for inner in self._scan(decoded, depth=depth + 1):
                matches.append(self._match(f"{decoder}>{inner.rule}", inner.category))
        return matches

    # ------------------------------------------------------------------ decisions
    def check(self, text: str) -> GuardDecision:
        """Decide what to do with ``text`` (see :class:`GuardDecision`)."""
        matches = tuple(self._scan(text))
        if not matches:
            return GuardDecision(
                action="allow", category=None, rule=None, text=neutralize_control_tokens(text)
            )
        primary = max(matches, key=lambda m: _SEVERITY[m.action])
        if primary.action == "block":
            return self._block(text, primary, matches)
        if primary.action == "strip":
            cleaned = self._strip(text)
            if not cleaned.strip():
                return self._block(text, primary, matches)
            return GuardDecision("strip", primary.category, primary.rule, cleaned, matches=matches)
        return GuardDecision(
            primary.action, primary.category, primary.rule, neutralize_control_tokens(text), matches=matches
        )

    def _block(self, text: str, primary: GuardMatch, matches: tuple[GuardMatch, ...]) -> GuardDecision:
        reply = self._policy.reply_for(primary.category, detect_language(text))
        return GuardDecision(
            "block", primary.category, primary.rule, neutralize_control_tokens(text), reply, matches
        )

    def _strip(self, text: str) -> str:
        """``text`` without hidden characters and without the sentences that strip-rules matched."""
        visible = strip_invisible(text)
        kept = [
            segment
            for segment in _SENTENCE.findall(visible)
            if not any(m.action == "strip" for m in self._scan(segment, depth=1))
        ]
        return neutralize_control_tokens("".join(kept)).strip()
