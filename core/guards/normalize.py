"""Text normalisation that defeats the usual spelling tricks before rules are matched.

Three views of a message are derived, each from the previous one:

``clean``    NFKC (full-width → half-width), zero-width and other format characters removed, Unicode tag
             characters decoded to the ASCII they hide, traditional → simplified Chinese, the polite 您
             folded to 你, look-alike letters (Cyrillic/Greek/...) folded to Latin, case folded, whitespace
             collapsed. Punctuation is kept.
``words``    ``clean`` with punctuation turned into spaces, letter-by-letter spacing ("i g n o r e") joined,
             and the gaps between Chinese characters removed ("忽 略", "忽.略" → "忽略").
             This is what :func:`normalize_for_matching` returns.
``compact``  ``words`` without any spaces, so "ig nore previ ous" still contains "ignoreprevious".
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import opencc

# Zero-width, joiners, bidi controls, soft hyphen, word joiner, BOM, Mongolian vowel separator and
# variation selectors: invisible characters used to split trigger words.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]"
)
# Unicode "tag" characters (U+E0020..U+E007E) mirror ASCII and render as nothing: "ASCII smuggling".
_TAG_OFFSET = 0xE0000
_TAGS = re.compile("[\U000e0000-\U000e007f]")
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_NON_WORD = re.compile(r"[^\w" + _CJK + "]+")
_UNDERSCORE = re.compile(r"_+")
_SPACES = re.compile(r"\s+")
_CJK_GAP = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}])")
# Three or more single letters/digits separated by single spaces: "i g n o r e".
_LETTER_RUN = re.compile(r"(?<!\S)(?:[a-z0-9] ){2,}[a-z0-9](?!\S)")
# Before whitespace is collapsed: letters split by one punctuation mark ("p.a.s.s", "忽-略") or by one
# space ("h o w   a r e"), where wider gaps still separate the words.
_DOTTED_RUN = re.compile(r"(?<![\w.\-*·•/|~+^_'])(?:\w[.\-*·•/|~+^_']){2,}\w(?![\w])")
_DOTTED_SEP = re.compile(r"[.\-*·•/|~+^_']")
_SPACED_RUN = re.compile(r"(?<!\S)(?:\w ){1,}\w(?!\S)")

_DATA_DIR = Path(str(resources.files("core.guards") / "data"))
# Variants that mean the same to a rule: the polite "you" is written like the plain one, so Chinese phrase
# lists and patterns need only one spelling.
_CJK_FOLD = str.maketrans({"您": "你"})


@dataclass(frozen=True, slots=True)
class NormalizedText:
    """The three matching views of one message (see the module docstring)."""

    clean: str
    words: str
    compact: str


@lru_cache(maxsize=1)
def _t2s() -> opencc.OpenCC:
    return opencc.OpenCC("t2s")


def _is_cjk_or_fullwidth(ch: str) -> bool:
    code = ord(ch)
    return 0x2E80 <= code <= 0xA4CF or 0xF900 <= code <= 0xFAFF or 0xFF00 <= code <= 0xFFEF


@lru_cache(maxsize=1)
def homoglyph_table() -> dict[int, str]:
    """Look-alike character → Latin letter/digit, from ``confusable_homoglyphs`` plus ``homoglyphs.txt``."""
    table: dict[int, str] = {}
    package_data = resources.files("confusable_homoglyphs") / "confusables.json"
    confusables: dict[str, list[dict[str, str]]] = json.loads(package_data.read_text(encoding="utf-8"))
    for char, alikes in confusables.items():
        if len(char) != 1 or char.isascii() or _is_cjk_or_fullwidth(char):
            continue
        for alike in alikes:
            target = alike["c"]
            if len(target) == 1 and target.isascii() and target.isalnum():
                table[ord(char)] = target
                break
    table.update(load_homoglyph_file(_DATA_DIR / "homoglyphs.txt"))
    return table


def load_homoglyph_file(path: Path) -> dict[int, str]:
    """Read ``<char> <replacement>`` lines (``#`` starts a comment); a missing file gives nothing."""
    table: dict[int, str] = {}
    if not path.is_file():
        return table
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) == 2 and len(parts[0]) == 1:
            table[ord(parts[0])] = parts[1]
    return table


def _decode_tags(match: re.Match[str]) -> str:
    code = ord(match.group()) - _TAG_OFFSET
    return chr(code) if 0x20 <= code <= 0x7E else ""


def _join_letters(match: re.Match[str]) -> str:
    return match.group().replace(" ", "")


def _join_dotted(match: re.Match[str]) -> str:
    return _DOTTED_SEP.sub("", match.group())


def clean_text(text: str, *, homoglyphs: dict[int, str] | None = None) -> str:
    """The ``clean`` view: canonical characters, punctuation kept."""
    text = _TAGS.sub(_decode_tags, text)
    text = _INVISIBLE.sub("", text)
    text = unicodedata.normalize("NFKC", text)
    if any("\u3400" <= ch <= "\u9fff" for ch in text):
        text = _t2s().convert(text).translate(_CJK_FOLD)
    text = text.translate(homoglyphs if homoglyphs is not None else homoglyph_table())
    text = text.casefold()
    text = _DOTTED_RUN.sub(_join_dotted, text)
    text = _SPACED_RUN.sub(_join_letters, text)
    return _SPACES.sub(" ", text).strip()


def words_view(clean: str) -> str:
    """The ``words`` view of an already cleaned text."""
    text = _UNDERSCORE.sub(" ", _NON_WORD.sub(" ", clean))
    text = _SPACES.sub(" ", text).strip()
    text = _LETTER_RUN.sub(_join_letters, text)
    return _CJK_GAP.sub("", text)


def normalize(text: str, *, homoglyphs: dict[int, str] | None = None) -> NormalizedText:
    """All three views of ``text``."""
    clean = clean_text(text, homoglyphs=homoglyphs)
    words = words_view(clean)
    return NormalizedText(clean=clean, words=words, compact=words.replace(" ", ""))


def normalize_for_matching(text: str) -> str:
    """Canonical form used for matching: "Ｉ ｇ ｎ ｏ ｒ ｅ" → "ignore", "忽 略 之 前" → "忽略之前"."""
    return normalize(text).words


def strip_invisible(text: str) -> str:
    """``text`` without zero-width, bidi-control and tag characters (nothing else changes)."""
    return _INVISIBLE.sub("", _TAGS.sub("", text))


def has_hidden_characters(text: str) -> bool:
    """Whether ``text`` carries characters that render as nothing (ZWJ inside emoji does not count)."""
    if _TAGS.search(text):
        return True
    # Most messages have no invisible character at all: one regex pass answers for them.
    return _INVISIBLE.search(text) is not None and any(
        _INVISIBLE.fullmatch(ch) and ch not in "\u200d\ufe0f\ufe0e" for ch in text
    )
