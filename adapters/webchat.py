"""Web chat: browser WebSocket frames <-> InboundMessage / reply events, and the web chat's sender.

The browser connects to ``/ws?session=ID&since=N`` and sends
``{"type": "message", "text": "...", "id": "<client id>", "lang": "zh"|"en"}`` (``type``, ``id`` and
``lang`` optional). The server answers with

- ``{"type": "session", "session": "..."}`` when it chose the session id itself,
- ``{"type": "delta", "text": "...", "id": ...}`` while the answer is written (provisional),
- ``{"type": "reply", "text": "...", "source": "...", "id": ..., "lang": ..., "seq": n}`` the final
  answer, which replaces the streamed text; ``seq`` numbers the session's replies (1, 2, ...),
- ``{"type": "held", "id": ...}`` when a person has the conversation: the message is theirs to
  answer and no bot reply follows (the agent's replies come as ``reply`` frames without ``id``),
- ``{"type": "error", "code": "...", "text": "...", "id": ...}`` for a frame it could not use or
  refused (rate limit); the socket stays open.

One browser session (an id the page keeps in localStorage) is one conversation: channel ``web``,
chat id = session id. The platform message id is ``"{session}:{client id}"``, so a frame the page sends
again after a reconnect is recognised as a duplicate.

The worker answering a message may run in another process than the socket: :class:`WebChatSender`
publishes the frames on the store channel ``webchat:{session}``, which the socket handler of that
session (in whichever gateway) subscribes to, and keeps each final reply ``BACKLOG_TTL`` seconds under
its ``seq`` so a browser that was away gets it when it reconnects with ``since`` = the last ``seq`` it
saw (:func:`read_backlog`).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

from core.delivery import ReplySender
from core.errors import StoreError
from core.language import detect_language
from core.messages import (
    ConversationKey,
    InboundMessage,
    Language,
    Reply,
    ReplyDelta,
    ReplyDone,
    ReplyEvent,
)
from core.stores.base import StateStore
from core.texts import text as fixed_text

log = logging.getLogger(__name__)

CHANNEL = "web"
MAX_FRAME_BYTES = 64 * 1024
"""Frames above this are refused with an error frame (a paste of a whole document, or abuse)."""

BACKLOG_TTL = 3600.0
"""Seconds a final reply is kept for a browser that reconnects."""

BACKLOG_SIZE = 50
"""At most this many of the latest replies are replayed on a reconnect."""

_REPLY_COUNTER_TTL = 30 * 24 * 3600.0
"""Lifetime of a session's reply numbering from its first reply; it then starts again at 1."""

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


def topic(session_id: str) -> str:
    """The store channel the frames of one browser session are published on."""
    return f"webchat:{session_id}"


def _backlog_key(session_id: str, seq: int) -> str:
    return f"webchat:{session_id}:reply:{seq}"


def _counter_key(session_id: str) -> str:
    return f"webchat:{session_id}:replies"


def message_id_of(session_id: str, client_id: str) -> str:
    """The platform message id of the page's message ``client_id``: unique across sessions."""
    return f"{session_id}:{client_id}"


def client_id_of(message_id: str | None) -> str | None:
    """The page's own id back from a platform message id (session ids never contain ``:``)."""
    if message_id is None:
        return None
    session, sep, client_id = message_id.partition(":")
    return client_id if sep and valid_session_id(session) else message_id


def parse_since(value: str | None) -> int | None:
    """The ``since`` query parameter: the last reply ``seq`` the page saw; None when absent or invalid."""
    if value is None or not value.isdigit() or len(value) > 18:
        return None
    return int(value)


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
        message_id = message_id_of(session_id, str(client_id))
    else:
        message_id = message_id_of(session_id, uuid.uuid4().hex)
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
    """A provisional piece of the answer to the message ``in_reply_to``."""
    return {"type": "delta", "text": delta.text, "id": client_id_of(in_reply_to)}


def reply_frame(done: ReplyDone | Reply, *, seq: int | None = None) -> Frame:
    """The final answer; the browser replaces the streamed text with it."""
    reply = done.reply if isinstance(done, ReplyDone) else done
    frame: Frame = {
        "type": "reply",
        "text": reply.text,
        "source": reply.source.value,
        "id": client_id_of(reply.in_reply_to),
        "lang": reply.language,
    }
    if seq is not None:
        frame["seq"] = seq
    return frame


def held_frame(message_id: str) -> Frame:
    """The message reached a person (the conversation is handed over): no bot answer will follow."""
    return {"type": "held", "id": client_id_of(message_id)}


def error_frame(error: FrameError, *, in_reply_to: str | None = None) -> Frame:
    """Why a frame was refused; ``in_reply_to`` names the message when there was one."""
    frame: Frame = {"type": "error", "code": error.code, "text": error.text, "lang": error.language}
    if in_reply_to is not None:
        frame["id"] = client_id_of(in_reply_to)
    return frame


def encode(frame: Frame) -> str:
    """A frame as WebSocket text (UTF-8 JSON, Chinese unescaped)."""
    return json.dumps(frame, ensure_ascii=False)


async def read_backlog(store: StateStore, session_id: str, *, since: int) -> list[tuple[int, str]]:
    """The stored reply frames of ``session_id`` numbered above ``since``, oldest first, as (seq, text).

    A ``since`` above the latest number means the numbering started again (its counter expired), so
    everything still kept is new to the page.
    """
    latest = int(await store.get(_counter_key(session_id)) or 0)
    if since > latest:
        since = 0
    frames: list[tuple[int, str]] = []
    for seq in range(max(since + 1, latest - BACKLOG_SIZE + 1), latest + 1):
        raw = await store.get(_backlog_key(session_id, seq))
        if raw is not None:  # expired, or the write failed after the number was taken
            frames.append((seq, raw))
    return frames


class WebChatSender(ReplySender):
    """Delivers answers to browsers by publishing frames on the session's store channel.

    Every gateway process holding a socket of the session forwards them. Final replies are also kept
    in the store for ``backlog_ttl`` seconds (:func:`read_backlog`): a browser offline at that moment
    gets them when it reconnects, so a reply counts as delivered once it is stored. Deltas are only a
    preview and are not kept.
    """

    channel = CHANNEL

    def __init__(self, *, store: StateStore, backlog_ttl: float = BACKLOG_TTL) -> None:
        self._store = store
        self._backlog_ttl = backlog_ttl

    async def send(self, reply: Reply) -> None:
        """Number the reply, keep it for reconnecting browsers, and publish it to the open sockets.

        Raises StoreError when the reply could not be kept (the worker retries the message).
        """
        if not reply.text:
            return  # a person has the conversation: no bot answer
        session = reply.key.chat_id
        seq = await self._store.incr(_counter_key(session), ttl=_REPLY_COUNTER_TTL)
        data = encode(reply_frame(reply, seq=seq))
        await self._store.set(_backlog_key(session, seq), data, ttl=self._backlog_ttl)
        await self._publish(session, data)

    async def deliver(self, message: InboundMessage, events: AsyncIterator[ReplyEvent]) -> Reply:
        """Publish the answer's deltas as they are written, then send the final reply."""
        session = message.key.chat_id
        final: Reply | None = None
        async for event in events:
            if isinstance(event, ReplyDelta):
                await self._publish(session, encode(delta_frame(event, in_reply_to=message.message_id)))
            elif isinstance(event, ReplyDone):
                final = event.reply
        if final is None:
            raise RuntimeError("engine stream ended without a reply")
        await self.send(final)
        return final

    async def _publish(self, session: str, data: str) -> None:
        # Best effort: a delta is a preview, and a final reply is already kept for the reconnect that
        # follows when the socket's own subscription fails with the store.
        try:
            await self._store.publish(topic(session), data)
        except StoreError:
            log.warning(
                "could not publish a web chat frame",
                exc_info=True,
                extra={"conversation": f"{CHANNEL}:{session}"},
            )
