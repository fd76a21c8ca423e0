"""Language of a customer's message: Chinese when it contains CJK ideographs, English otherwise."""

from __future__ import annotations

import re

from core.messages import Language

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def detect_language(text: str, *, hint: str | None = None) -> Language:
    """``hint`` is a platform language code (Telegram's ``language_code``) used when text is ambiguous."""
    if _CJK.search(text):
        return "zh"
    if any(ch.isalpha() for ch in text):
        return "en"
    if hint and hint.lower().startswith("zh"):
        return "zh"
    return "en" if hint else "zh"
