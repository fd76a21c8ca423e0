"""Payloads hidden from the rules: encodings and spellings that a message can be decoded from.

:func:`hidden_payloads` names every plausible decoding of a message, each as ``(decoder, decoded text)``:
base64 (also URL-safe), hex, percent-encoding, rot13, leetspeak ("1gn0r3 pr3v10u5") and text written
backwards. The guard scans each decoding with the same rules and reports a hit as ``decoder>rule``.
Every decoder is guarded by a cheap test, so ordinary messages pay almost nothing.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
import urllib.parse

from core.guards.normalize import strip_invisible

_LATIN_ALNUM = re.compile(r"[a-z0-9]")
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX = re.compile(r"(?<![0-9a-f])(?:[0-9a-f]{2}[ :]?){8,}(?![0-9a-f])")
_PERCENT = re.compile(r"(?:%[0-9a-f]{2}){4,}", re.IGNORECASE)
# A word that mixes letters with the digits leetspeak uses for them: "pr3v10u5", "1gn0r3".
_LEET_WORD = re.compile(r"\b(?=[a-z0-9]*[a-z])(?=[a-z0-9]*[013457])[a-z0-9]{3,}\b")
_LEET = str.maketrans("013457", "oieast")
# Frequent English words: a Latin message with none of them that gains some when decoded is encoded.
# fmt: off
_STOPWORDS = frozenset({
    "the", "a", "an", "and", "or", "to", "of", "in", "is", "are", "you", "your", "me", "my", "it",
    "this", "that", "for", "with", "not", "all", "what", "how", "please", "tell", "say", "ignore",
    "previous", "instructions", "password", "system", "prompt", "into", "from", "now", "reveal",
    "secret", "rules", "print", "repeat", "show", "give", "new",
})
# fmt: on


def hidden_payloads(text: str, *, clean: str, words: str) -> list[tuple[str, str]]:
    """(decoder name, decoded text) for every plausible hidden payload of a message.

    ``clean`` and ``words`` are the message's normalised views (see :mod:`core.guards.normalize`).
    """
    found = _encoded_payloads(text, clean)
    for name, decode in (("rot13", _rot13_of), ("leet", _leet_of), ("reversed", _reversed_of)):
        decoded = decode(words)
        if decoded is not None:
            found.append((name, decoded))
    return found


def _printable_text(data: bytes) -> str | None:
    """``data`` as text when it decodes to mostly printable UTF-8 with some letters, else None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(text) < 4:
        return None
    printable = sum(ch.isprintable() or ch.isspace() for ch in text)
    letters = sum(ch.isalpha() for ch in text)
    return text if printable >= 0.95 * len(text) and letters >= 4 else None


def _decode_base64(token: str) -> str | None:
    padded = token + "=" * (-len(token) % 4)
    try:
        if "-" in token or "_" in token:
            return _printable_text(base64.urlsafe_b64decode(padded))
        return _printable_text(base64.b64decode(padded, validate=True))
    except (binascii.Error, ValueError):
        return None


def _encoded_payloads(text: str, clean: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for token in _BASE64.findall(unicodedata.normalize("NFKC", strip_invisible(text))):
        decoded = _decode_base64(token)
        if decoded:
            found.append(("base64", decoded))
    for token in _HEX.findall(clean):
        try:
            decoded = _printable_text(bytes.fromhex(re.sub(r"[ :]", "", token)))
        except ValueError:
            decoded = None
        if decoded:
            found.append(("hex", decoded))
    if "%" in text and _PERCENT.search(text):
        found.append(("percent", urllib.parse.unquote(text)))
    return found


def _could_be_encoded(words: str) -> bool:
    """Whether ``words`` is Latin text with too few frequent English words to be plain English.

    A decoding only counts when it has more than twice as many of them (see :func:`_gains_stopwords`),
    which is impossible once they are half the words already, so plain English skips the decoding.
    """
    tokens = words.split()
    if len(tokens) < 3 or not _LATIN_ALNUM.search(words):
        return False
    return 2 * sum(t in _STOPWORDS for t in tokens) < len(tokens)


def _gains_stopwords(plain: str, decoded: str) -> bool:
    before = sum(t in _STOPWORDS for t in plain.split())
    after = sum(t in _STOPWORDS for t in decoded.split())
    return after >= 2 and after > 2 * before


def _rot13_of(words: str) -> str | None:
    """The rot13 decoding of ``words`` when the message reads like rot13-encoded English, else None."""
    if not _could_be_encoded(words):
        return None
    rot = codecs.encode(words, "rot13")
    return rot if _gains_stopwords(words, rot) else None


def _leet_of(words: str) -> str | None:
    """``words`` with leetspeak digits read as letters, when at least two words are written that way."""
    if len(_LEET_WORD.findall(words)) < 2:
        return None
    return _LEET_WORD.sub(lambda m: m.group().translate(_LEET), words)


def _reversed_of(words: str) -> str | None:
    """``words`` read backwards, when the message reads like backwards English."""
    if not _could_be_encoded(words):
        return None
    backwards = words[::-1]
    return backwards if _gains_stopwords(words, backwards) else None
