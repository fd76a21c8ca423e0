"""Weak-signal rules, matched in one pass.

Every phrase of every :class:`~core.guards.rules.SignalRule` sits in one Aho-Corasick automaton per view
(whole words for Latin phrases, the spaceless view for Chinese ones), tagged with its rule and group.
A rule fires when the phrases found in a message meet its thresholds: long role-play jailbreaks are made
of many such phrases, while an ordinary message that happens to say "rules" or "AI" holds one or two.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import ahocorasick  # type: ignore[import-not-found]  # the C extension ships no type stubs

from core.guards.normalize import normalize
from core.guards.rules import SignalRule, add_phrase

_LATIN_ALNUM = re.compile(r"[a-z0-9]")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@dataclass(frozen=True, slots=True)
class _Hit:
    rule: int
    group: str
    phrase: str


class SignalIndex:
    """The phrases of all signal rules; :meth:`first_firing` names the first rule a message satisfies."""

    def __init__(self, rules: Sequence[SignalRule], *, homoglyphs: dict[int, str]) -> None:
        self._rules = tuple(rules)
        self._words = ahocorasick.Automaton()
        self._compact = ahocorasick.Automaton()
        for index, rule in enumerate(self._rules):
            for group, phrases in rule.groups.items():
                for phrase in phrases:
                    norm = normalize(phrase, homoglyphs=homoglyphs)
                    if _CJK.search(norm.compact):
                        add_phrase(self._compact, norm.compact, _Hit(index, group, norm.compact))
                    elif norm.words:
                        add_phrase(self._words, norm.words, _Hit(index, group, norm.words))
        for automaton in (self._words, self._compact):
            if len(automaton):
                automaton.make_automaton()

    def first_firing(self, words: str, compact: str) -> SignalRule | None:
        """The first rule whose thresholds the ``words``/``compact`` views of a message meet, or None."""
        if not self._rules:
            return None
        found: dict[int, dict[str, set[str]]] = {}
        if len(self._words):
            for end, hits in self._words.iter(words):
                hit: _Hit
                for hit in hits:
                    start = end - len(hit.phrase) + 1
                    before = words[start - 1] if start > 0 else " "
                    after = words[end + 1] if end + 1 < len(words) else " "
                    if not (_LATIN_ALNUM.match(before) or _LATIN_ALNUM.match(after)):
                        found.setdefault(hit.rule, {}).setdefault(hit.group, set()).add(hit.phrase)
        if len(self._compact):
            for _end, hits in self._compact.iter(compact):
                for hit in hits:
                    found.setdefault(hit.rule, {}).setdefault(hit.group, set()).add(hit.phrase)
        for index in sorted(found):
            rule, groups = self._rules[index], found[index]
            phrases = set().union(*groups.values())
            if (
                len(groups) >= rule.min_groups
                and len(phrases) >= rule.min_phrases
                and rule.require <= groups.keys()
            ):
                return rule
        return None
