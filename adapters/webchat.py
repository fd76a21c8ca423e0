"""Web chat: browser WebSocket frames <-> InboundMessage / reply events. Pure translation, no I/O.

The browser sends ``{"type": "message", "text": "...", "id": "<client id>", "lang": "zh"|"en"}``
(``type``, ``id`` and ``lang`` optional). The server answers with

- ``{"type": "session", "session": "..."}`` when it chose the session id itself,
- ``{"type": "delta", "text": "...", "id": ...}`` while the answer is written (provisional),
- ``{"type": "reply", "text": "...", "source": "...", "id": ..., "lang": ...}`` the final answer,
  which replaces the streamed text,
- ``{"type": "error", "code": "...", "text": "..."}`` for a frame it could not use; the socket stays
  open.

One browser session (an id the page keeps in localStorage) is one conversation: channel ``web``,
chat id = session id.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from typing import Any

from core.language import detect_language
from core.messages import ConversationKey, InboundMessage, Language, ReplyDelta, ReplyDone
from core.texts import text as fixed_text

CHANNEL = "web"
MAX_FRAME_BYTES = 64 * 1024
"""Frames above this are refused with an error frame (a paste of a whole document, or abuse)."""

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")

Frame = dict[str, Any]


class FrameError(ValueError):
    """A frame the server cannot use; ``code`` and ``text`` go back to the browser."""

    def __init__(self, code: str, text: str, *, language: Language = "zh") -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text
        self.language = language


def bad_session() -> FrameError:
    """The refusal of a session id that :func:`valid_session_id` rejects."""
    return FrameError("bad_session", "session id must be 8-64 characters of [A-Za-z0-9_-]")


def valid_session_id(value: str | None) -> bool:
    """Whether ``value`` is a usable browser session id ([A-Za-z0-9_-], 8 to 64 characters)."""
    return value is not None and _SESSION_ID.fullmatch(value) is not None


def new_session_id() -> str:
    """A fresh random session id (for browsers that did not send one)."""
    return secrets.token_urlsafe(18)


def decode_frame(raw: str | bytes, *, input_limit: int = 4000) -> Frame:
    """Parse one WebSocket frame into a JSON object, or raise :class:`FrameError`.

    ``input_limit`` is the longest message in characters the engine takes (KEFU_MAX_INPUT_CHARS); the
    refusal of an oversized frame quotes it, since that is the limit the customer can act on.
    """
    size = len(raw.encode("utf-8")) if isinstance(raw, str) else len(raw)
    if size > MAX_FRAME_BYTES:
        head = raw[:2048] if isinstance(raw, str) else raw[:2048].decode("utf-8", "ignore")
        # Not parsed (too big to parse), so undo JSON's \uXXXX escapes to see the customer's script.
        language = detect_language(_JSON_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), head))
        raise FrameError(
            "too_large",
            fixed_text("input_too_long", language, limit=input_limit),
            language=language,
        )
    try:
        frame = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FrameError("bad_json", "frame is not valid JSON") from exc
    if not isinstance(frame, dict):
        raise FrameError("bad_frame", "frame must be a JSON object")
    return frame


def to_inbound(session_id: str, frame: Frame) -> InboundMessage:
    """The customer message in ``frame`` from the browser session ``session_id``."""
    if not valid_session_id(session_id):
        raise bad_session()
    kind = frame.get("type", "message")
    if kind != "message":
        raise FrameError("bad_type", f"unknown frame type {kind!r}")
    text = frame.get("text")
    if not isinstance(text, str):
        raise FrameError("missing_text", "frame has no text")
    client_id = frame.get("id")
    if isinstance(client_id, str | int) and _CLIENT_ID.fullmatch(str(client_id)):
        message_id = str(client_id)
    else:
        message_id = uuid.uuid4().hex
    lang = frame.get("lang")
    language: Language = lang if lang in ("zh", "en") else detect_language(text)
    return InboundMessage(
        key=ConversationKey(channel=CHANNEL, chat_id=session_id),
        user_id=session_id,
        message_id=message_id,
        text=text,
        language=language,
    )


def session_frame(session_id: str) -> Frame:
    """Tells the browser the session id the server chose for it."""
    return {"type": "session", "session": session_id}


def delta_frame(delta: ReplyDelta, *, in_reply_to: str | None = None) -> Frame:
    """A provisional piece of the answer."""
    return {"type": "delta", "text": delta.text, "id": in_reply_to}


def reply_frame(done: ReplyDone) -> Frame:
    """The final answer; the browser replaces the streamed text with it."""
    reply = done.reply
    return {
        "type": "reply",
        "text": reply.text,
        "source": reply.source.value,
        "id": reply.in_reply_to,
        "lang": reply.language,
    }


def error_frame(error: FrameError) -> Frame:
    """Why a frame was refused."""
    return {"type": "error", "code": error.code, "text": error.text, "lang": error.language}


def encode(frame: Frame) -> str:
    """A frame as WebSocket text (UTF-8 JSON, Chinese unescaped)."""
    return json.dumps(frame, ensure_ascii=False)
