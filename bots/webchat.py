"""The web chat: ``GET /`` serves the page, WebSocket ``/ws?session=ID&since=N`` carries the conversation.

The web chat is a channel like the others: each frame becomes an :class:`~core.messages.InboundMessage`
that the intake dedupes, rate-limits and puts in the durable inbox; a worker (in this process or any
other sharing the store) answers it and :class:`adapters.webchat.WebChatSender` publishes the deltas and
the final reply on the store channel ``webchat:{session}``. While the socket is open this handler is
subscribed to that channel and forwards the frames. A browser that goes away mid-answer does not cut the
answer short: it is finished and stored, and the final reply waits in the session's backlog until the
browser reconnects with ``since`` = the last reply number it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from functools import cache, partial
from importlib import resources

import anyio
from anyio.abc import TaskGroup
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from adapters import webchat as frames
from core.intake import Accepted
from core.messages import ConversationKey
from core.runtime import Runtime
from core.settings import Settings
from core.stores.base import Subscription
from core.texts import text as fixed_text

log = logging.getLogger(__name__)

# The page has inline CSS and JS only and talks to its own origin.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; frame-ancestors 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def page_html() -> str:
    """The chat page shipped as package data."""
    return resources.files("bots").joinpath("static/webchat.html").read_text(encoding="utf-8")


async def chat_page(request: Request) -> HTMLResponse:
    """The web chat page."""
    return HTMLResponse(page_html(), headers=_PAGE_HEADERS)


def enabled(settings: Settings) -> bool:
    """The web chat is always on: it needs no credentials."""
    return True


def build_sender(settings: Settings, runtime: Runtime) -> frames.WebChatSender:
    """The outbound side, for the worker: frames published through the shared store."""
    return frames.WebChatSender(store=runtime.store)


class _Peer:
    """The browser end of the socket; remembers when it went away so nothing more is sent."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.connected = True
        # Two tasks write to the socket: the forwarder and the reader's refusals.
        self._sending = asyncio.Lock()

    async def send(self, frame: frames.Frame) -> None:
        await self.send_text(frames.encode(frame))

    async def send_text(self, data: str) -> None:
        if not self.connected:
            return
        async with self._sending:
            try:
                await self.websocket.send_text(data)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.connected = False


async def chat_socket(websocket: WebSocket) -> None:
    """One browser session: forward the session's frames and accept its messages until it disconnects."""
    runtime: Runtime = websocket.app.state.runtime
    session = websocket.query_params.get("session")
    since = frames.parse_since(websocket.query_params.get("since"))
    peer = _Peer(websocket)
    if session is not None and not frames.valid_session_id(session):
        await websocket.accept()
        await peer.send(frames.error_frame(frames.bad_session()))
        await websocket.close(code=1008)
        return
    chosen = session is None
    session = session or frames.new_session_id()
    context = {"conversation": f"{frames.CHANNEL}:{session}"}
    close_code = 1000
    try:
        # Subscribed before the socket opens (a page sending at once finds its answer's frames
        # coming) and before the backlog is read (a reply finished in between is in one or the other).
        async with runtime.store.subscribe(frames.topic(session)) as subscription:
            await websocket.accept()
            log.info("web chat connected", extra=context)
            if chosen:
                await peer.send(frames.session_frame(session))
            backlog = [] if since is None else await frames.read_backlog(runtime.store, session, since=since)
            # Either side ending ends both: the browser left, or the subscription failed. A task group,
            # not bare asyncio tasks, so cancellation from the server (shutdown, test client) is clean.
            async with anyio.create_task_group() as group:
                group.start_soon(_until_done, group, partial(_forward, subscription, peer, backlog))
                group.start_soon(_until_done, group, partial(_receive, runtime, peer, session))
    except Exception:
        # The store failed (Redis down): close with "try again later" so the page reconnects, and the
        # backlog brings what it missed.
        log.error("web chat session failed", exc_info=True, extra=context)
        close_code = 1011
        if websocket.client_state == WebSocketState.CONNECTING:
            await websocket.accept()
    log.info("web chat disconnected", extra=context)
    if websocket.client_state == WebSocketState.CONNECTED and peer.connected:
        with contextlib.suppress(RuntimeError, OSError):  # the other end closed at the same moment
            await websocket.close(code=close_code)


async def _until_done(group: TaskGroup, work: Callable[[], Awaitable[None]]) -> None:
    try:
        await work()
    finally:
        group.cancel_scope.cancel()


async def _forward(subscription: Subscription, peer: _Peer, backlog: list[tuple[int, str]]) -> None:
    """Send the missed replies, then every frame published for the session, until the browser leaves."""
    sent: set[int] = set()
    finished: set[str] = set()

    async def relay(data: str) -> None:
        try:
            frame = json.loads(data)
        except json.JSONDecodeError:
            log.warning("dropped an unreadable web chat frame from the store")
            return
        if not isinstance(frame, dict):
            return
        reply_to = frame.get("id")
        if frame.get("type") == "reply":
            seq = frame.get("seq")
            # A reply finished while the backlog was read arrives both ways: send it once.
            if isinstance(seq, int) and seq in sent:
                return
            if isinstance(seq, int):
                sent.add(seq)
            if isinstance(reply_to, str):
                finished.add(reply_to)
        elif frame.get("type") == "delta" and reply_to in finished:
            return  # late preview of an answer the page already has in full
        await peer.send_text(data)

    for _seq, data in backlog:
        await relay(data)
    async for data in subscription:
        await relay(data)
        if not peer.connected:
            return


async def _receive(runtime: Runtime, peer: _Peer, session: str) -> None:
    """Read the browser's frames and hand each message to the intake, until the browser disconnects."""
    websocket = peer.websocket
    context = {"conversation": f"{frames.CHANNEL}:{session}"}
    input_limit = runtime.settings.max_input_chars
    while peer.connected:
        try:
            event = await websocket.receive()
        except (WebSocketDisconnect, RuntimeError):
            return
        if event["type"] == "websocket.disconnect":
            return
        raw = event.get("text")
        if raw is None:
            raw = event.get("bytes") or b""
        try:
            message = frames.to_inbound(session, frames.decode_frame(raw, input_limit=input_limit))
        except frames.FrameError as error:
            log.info("refused a web chat frame: %s", error.code, extra=context)
            await peer.send(frames.error_frame(error))
            continue
        extra = {**context, "message_id": message.message_id}
        try:
            accepted = await runtime.intake.accept(message)
        except Exception:
            # Not queued (the store or inbox is down): the customer is told; the page may send it again.
            log.error("could not accept a web chat message", exc_info=True, extra=extra)
            await peer.send(
                frames.error_frame(
                    frames.FrameError(
                        "unavailable", fixed_text("apology", message.language), language=message.language
                    ),
                    in_reply_to=message.message_id,
                )
            )
            continue
        if accepted is Accepted.LIMITED:
            # The intake already queued one notice this minute; this message will not be answered.
            await peer.send(
                frames.error_frame(
                    frames.FrameError(
                        "rate_limited",
                        fixed_text("rate_limited", message.language),
                        language=message.language,
                    ),
                    in_reply_to=message.message_id,
                )
            )
        elif accepted is Accepted.NEW and await _with_a_person(runtime, message.key, extra):
            # The worker stores the message and sends no bot answer: the page stops waiting for one.
            await peer.send(frames.held_frame(message.message_id))
        # Otherwise the answer comes through the subscription. DUPLICATE (a frame sent again after a
        # reconnect): its answer is on the way or in the backlog; nothing new to do.


async def _with_a_person(runtime: Runtime, key: ConversationKey, extra: dict[str, str]) -> bool:
    try:
        return await runtime.engine.is_paused(key)
    except Exception:
        log.warning("could not read the conversation state", exc_info=True, extra=extra)
        return False


routes: list[BaseRoute] = [
    Route("/", chat_page, methods=["GET"]),
    WebSocketRoute("/ws", chat_socket),
]
