"""Cleaning of customer text before anything else looks at it."""

from __future__ import annotations

import json
import unicodedata

_KEEP = {"\n", "\t"}


def clean_text(text: str) -> str:
    """NFC-normalised text without control characters, lone surrogates or NULs, stripped."""
    if _has_surrogate(text):
        text = text.encode("utf-8", "replace").decode("utf-8")
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    cleaned = "".join(
        ch for ch in text if ch in _KEEP or unicodedata.category(ch) not in ("Cc", "Cs", "Co", "Cn")
    )
    return cleaned.strip()


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def looks_like_garbage(answer: str) -> bool:
    """True for model output no customer should see: empty, or without a single letter or digit."""
    stripped = answer.strip()
    if not stripped:
        return True
    return not any(ch.isalnum() for ch in stripped)


def looks_like_tool_call(answer: str) -> bool:
    """True for an answer that is a tool call written as text (a small model imitating earlier turns)."""
    stripped = answer.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return False
    try:
        value = json.loads(stripped)
    except ValueError:
        return False
    return isinstance(value, dict) and bool({"tool", "name", "function", "arguments"} & set(value))
