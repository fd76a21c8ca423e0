"""Loading the guard's data files: lexicons (``*.txt``), regex rules (``*.yaml`` with ``patterns``),
weak-signal rules (``*.yaml`` with ``signals``), the per-category policy (``policy.yaml``) and extra
look-alike folds (``homoglyphs.txt``).

A broken file is a configuration mistake, so it fails loudly at load time with :class:`ConfigError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from core.errors import ConfigError

Action = Literal["allow", "block", "strip", "flag"]
View = Literal["words", "clean", "raw"]
Script = Literal["han", "latin"]
ACTIONS: tuple[Action, ...] = ("allow", "block", "strip", "flag")
_VIEWS: tuple[View, ...] = ("words", "clean", "raw")
_SCRIPTS: tuple[Script, ...] = ("han", "latin")
_FRAGMENT = re.compile(r"%\{(\w+)\}")
HOMOGLYPH_FILE = "homoglyphs.txt"
POLICY_FILE = "policy.yaml"


@dataclass(frozen=True, slots=True)
class LexiconEntry:
    """One phrase from a lexicon file."""

    rule: str
    category: str
    phrase: str


@dataclass(frozen=True, slots=True)
class PatternRule:
    """One compiled regex rule from a patterns file."""

    rule: str
    category: str
    view: View
    pattern: re.Pattern[str]
    requires: re.Pattern[str] | None = None
    unless: re.Pattern[str] | None = None
    script: Script | None = None

    def matches(self, text: str) -> bool:
        """Whether the rule fires on ``text`` (already in this rule's view)."""
        # ``requires`` is usually a cheap keyword test, so it doubles as a prefilter.
        if self.requires is not None and self.requires.search(text) is None:
            return False
        if self.pattern.search(text) is None:
            return False
        return self.unless is None or self.unless.search(text) is None


@dataclass(frozen=True, slots=True)
class SignalRule:
    """A rule made of weak signals: phrases that are harmless alone but give an attack away together.

    It fires when a message holds phrases from at least ``min_groups`` groups, ``min_phrases`` different
    phrases in all, and a phrase of every group named in ``require``.
    """

    rule: str
    category: str
    groups: Mapping[str, tuple[str, ...]]
    min_groups: int
    min_phrases: int
    require: frozenset[str] = frozenset()


@dataclass(slots=True)
class Policy:
    """Action per category and the polite replies used when a message is blocked."""

    default_action: Action = "block"
    actions: dict[str, Action] = field(default_factory=dict)
    replies: dict[str, dict[str, str]] = field(default_factory=dict)

    def action_for(self, category: str) -> Action:
        """The configured action for ``category`` (the default action for unknown categories)."""
        return self.actions.get(category, self.default_action)

    def reply_for(self, category: str, language: str) -> str:
        """The blocked-message answer for ``category`` in ``language`` (falls back to the default)."""
        variants = self.replies.get(category) or self.replies.get("default") or {}
        return variants.get(language) or variants.get("zh") or next(iter(variants.values()), "")

    def merge(self, other: Mapping[str, Any], *, source: Path) -> None:
        """Apply a ``policy.yaml`` document on top of this policy."""
        default = other.get("default_action")
        if default is not None:
            self.default_action = _action(default, source)
        for category, action in (other.get("categories") or {}).items():
            self.actions[str(category)] = _action(action, source)
        for category, variants in (other.get("replies") or {}).items():
            if not isinstance(variants, Mapping):
                raise ConfigError(f"{source}: replies.{category} must map language to text")
            self.replies.setdefault(str(category), {}).update({str(k): str(v) for k, v in variants.items()})


def _action(value: object, source: Path) -> Action:
    for action in ACTIONS:
        if value == action:
            return action
    raise ConfigError(f"{source}: unknown action {value!r} (expected one of {', '.join(ACTIONS)})")


def read_lexicon(path: Path) -> list[LexiconEntry]:
    """Parse ``<category> | <phrase>`` lines (a tab may stand for the bar)."""
    entries: list[LexiconEntry] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        category, sep, phrase = line.replace("\t", "|", 1).partition("|")
        category, phrase = category.strip(), phrase.strip()
        if not sep or not category or not phrase:
            raise ConfigError(f"{path}:{number}: expected '<category> | <phrase>', got {line!r}")
        entries.append(LexiconEntry(rule=f"{path.stem}:{phrase}", category=category, phrase=phrase))
    return entries


def _compile(source: str, fragments: Mapping[str, str], where: str, *, ignore_case: bool) -> re.Pattern[str]:
    def expand(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in fragments:
            raise ConfigError(f"{where}: unknown fragment %{{{name}}}")
        return fragments[name]

    try:
        # The words/clean views are already case-folded; IGNORECASE would only slow every search down.
        flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
        return re.compile(_FRAGMENT.sub(expand, source), flags)
    except re.error as exc:
        raise ConfigError(f"{where}: invalid regex: {exc}") from exc


def read_patterns(path: Path, *, fragments: dict[str, str]) -> list[PatternRule]:
    """Parse a patterns YAML file; its ``fragments`` are added to ``fragments`` for later files too."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(document, Mapping):
        raise ConfigError(f"{path}: expected a mapping with 'patterns'")
    fragments.update({str(k): str(v) for k, v in (document.get("fragments") or {}).items()})
    rules: list[PatternRule] = []
    for index, item in enumerate(document.get("patterns") or []):
        where = f"{path}: patterns[{index}]"
        if not isinstance(item, Mapping) or not {"id", "category", "pattern"} <= item.keys():
            raise ConfigError(f"{where}: needs id, category and pattern")
        view = item.get("view", "words")
        if view not in _VIEWS:
            raise ConfigError(f"{where}: view must be one of {', '.join(_VIEWS)}")
        script = item.get("script")
        if script is not None and script not in _SCRIPTS:
            raise ConfigError(f"{where}: script must be one of {', '.join(_SCRIPTS)}")
        raw = view == "raw"
        rules.append(
            PatternRule(
                rule=str(item["id"]),
                category=str(item["category"]),
                view=cast(View, view),
                pattern=_compile(str(item["pattern"]), fragments, where, ignore_case=raw),
                requires=(
                    _compile(str(item["requires"]), fragments, where, ignore_case=raw)
                    if item.get("requires")
                    else None
                ),
                unless=(
                    _compile(str(item["unless"]), fragments, where, ignore_case=raw)
                    if item.get("unless")
                    else None
                ),
                script=cast(Script | None, script),
            )
        )
    return rules


def read_signals(path: Path) -> list[SignalRule]:
    """Parse the ``signals`` list of a YAML rules file (see :class:`SignalRule`)."""
    rules: list[SignalRule] = []
    for index, item in enumerate(read_yaml_mapping(path).get("signals") or []):
        where = f"{path}: signals[{index}]"
        if not isinstance(item, Mapping) or not {"id", "category", "groups"} <= item.keys():
            raise ConfigError(f"{where}: needs id, category and groups")
        groups = item["groups"]
        if not isinstance(groups, Mapping) or not groups:
            raise ConfigError(f"{where}: groups must map a group name to a list of phrases")
        phrases = {
            str(name): _phrase_list(values, f"{where}.groups.{name}") for name, values in groups.items()
        }
        require = frozenset(str(name) for name in item.get("require") or ())
        if not require <= phrases.keys():
            raise ConfigError(f"{where}: require names an unknown group: {sorted(require - phrases.keys())}")
        min_groups = _positive_int(item.get("min_groups", 2), f"{where}.min_groups")
        if min_groups > len(phrases):
            raise ConfigError(f"{where}: min_groups is larger than the number of groups")
        rules.append(
            SignalRule(
                rule=str(item["id"]),
                category=str(item["category"]),
                groups=phrases,
                min_groups=min_groups,
                min_phrases=_positive_int(item.get("min_phrases", min_groups), f"{where}.min_phrases"),
                require=require,
            )
        )
    return rules


def _phrase_list(values: object, where: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: expected a non-empty list of phrases")
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise ConfigError(f"{where}: expected a non-empty list of phrases")
    return tuple(v.strip() for v in values)


def _positive_int(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value


def read_yaml_mapping(path: Path) -> Mapping[str, Any]:
    """The YAML mapping in ``path``; ConfigError naming the file when it is not one."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(document, Mapping):
        raise ConfigError(f"{path}: expected a mapping")
    return document


def read_policy(path: Path, policy: Policy) -> None:
    """Merge ``path`` (a policy YAML file) into ``policy``."""
    policy.merge(read_yaml_mapping(path), source=path)


def add_phrase(automaton: Any, key: str, phrase: object) -> None:
    """Add ``phrase`` under ``key`` to an Aho-Corasick automaton, keeping phrases already there."""
    existing: tuple[object, ...] = automaton.get(key, ())
    automaton.add_word(key, (*existing, phrase))


def data_files(directories: Iterable[Path]) -> list[Path]:
    """Every data file of ``directories`` in load order (directory order, then file name)."""
    files: list[Path] = []
    for directory in directories:
        if not directory.is_dir():
            raise ConfigError(f"guard data directory {directory} does not exist")
        files.extend(sorted(p for p in directory.iterdir() if p.suffix in {".txt", ".yaml", ".yml"}))
    return files
