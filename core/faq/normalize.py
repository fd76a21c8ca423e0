"""Text normalisation for FAQ lookup: the cache key and the retriever's tokens.

``normalize_question`` is the FAQ cache key: two questions that differ only in case, full/half width,
traditional vs simplified characters, punctuation, spacing or a trailing modal particle get the same key.
``mask_entities`` additionally replaces order numbers, phone numbers, e-mail addresses and other numbers
with placeholder tokens so "订单KF2025001怎么还没到" matches "我的订单怎么还没到"; it is used for
retrieval only, because a cached *model* answer may depend on the very order number it was asked about.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from functools import lru_cache

import opencc

__all__ = ["mask_entities", "normalize_question", "to_simplified"]

# Placeholders are ASCII words so both the Chinese segmenter and the English tokenizer keep them whole.
ORDER_TOKEN = "ordernum"
PHONE_TOKEN = "phonenum"
EMAIL_TOKEN = "emailaddr"
NUMBER_TOKEN = "num"

_converter_lock = threading.Lock()
_converter: opencc.OpenCC | None = None

# Modal particles a customer tacks on to the end of a question; they never change its meaning.
_TRAILING_PARTICLES = "呢吗嘛么啊呀吧哦哈啦咧"
_TRAILING_RE = re.compile(f"[{_TRAILING_PARTICLES}]+$")
_SPACE_RE = re.compile(r"\s+")

_EMAIL_RE = re.compile(r"[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}")
# Mainland mobile (11 digits starting 1[3-9]) or an international number written with + and digits.
_PHONE_RE = re.compile(r"(?<![a-z0-9])(?:\+?86[- ]?)?1[3-9]\d{9}(?![a-z0-9])|\+\d[\d -]{7,}\d")
# An order id: letters followed by at least 5 digits (kf2025001, jd123456), or a bare run of 8+ digits.
_ORDER_RE = re.compile(r"(?<![a-z0-9])(?:[a-z]{1,4}-?\d{5,}[a-z0-9]*|\d{8,})(?![a-z0-9])")
_NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)*")
# "***" is how public corpora mask numbers; treat it like a number.
_MASKED_RE = re.compile(r"\*{2,}")


def _t2s() -> opencc.OpenCC:
    global _converter
    if _converter is None:
        with _converter_lock:
            if _converter is None:
                _converter = opencc.OpenCC("t2s")
    return _converter


@lru_cache(maxsize=65536)
def to_simplified(text: str) -> str:
    """Traditional → simplified Chinese (OpenCC ``t2s``); other scripts pass through unchanged."""
    return str(_t2s().convert(text))


def _strip_punctuation(text: str) -> str:
    # Unicode categories P* (punctuation) and S* (symbols) become spaces, so "ok?thanks" stays two words.
    return "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)


@lru_cache(maxsize=65536)
def normalize_question(text: str) -> str:
    """The FAQ cache key: NFKC, lower case, simplified Chinese, no punctuation or trailing particles.

    Deterministic and pure; whitespace collapses to single spaces and is dropped between CJK characters.
    """
    text = unicodedata.normalize("NFKC", text)
    text = to_simplified(text).lower()
    text = _strip_punctuation(text)
    text = _SPACE_RE.sub(" ", text).strip()
    # Spaces between two CJK characters are noise ("怎么 退款" == "怎么退款"); spaces between words are not.
    text = re.sub(r"(?<=[\u3400-\u9fff]) (?=[\u3400-\u9fff])", "", text)
    stripped = _TRAILING_RE.sub("", text).rstrip()
    # Never reduce a question to nothing ("吗?" stays "吗").
    return stripped or text


def mask_entities(text: str) -> str:
    """Normalise like ``normalize_question`` and replace order/phone/e-mail/number entities by tokens."""
    text = unicodedata.normalize("NFKC", text)
    text = to_simplified(text).lower()
    text = _EMAIL_RE.sub(f" {EMAIL_TOKEN} ", text)
    text = _PHONE_RE.sub(f" {PHONE_TOKEN} ", text)
    text = _ORDER_RE.sub(f" {ORDER_TOKEN} ", text)
    text = _MASKED_RE.sub(f" {NUMBER_TOKEN} ", text)
    text = _NUMBER_RE.sub(f" {NUMBER_TOKEN} ", text)
    return normalize_question(text)
