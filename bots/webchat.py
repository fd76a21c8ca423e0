"""The web chat: ``GET /`` serves the chat page, WebSocket ``/ws?session=ID`` carries the conversation.

Frames are translated by :mod:`adapters.webchat`. Messages on one socket are answered in order; deltas
are forwarded as the model writes and the final reply replaces them. A browser that goes away mid-answer
does not cut the answer short: it is still finished and stored with the conversation.
"""

from __future__ import annotations

import contextlib
import logging
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from adapters import webchat as frames
from core.messages import InboundMessage, ReplyDelta, ReplyDone
from core.runtime import Runtime
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


class _Peer:
    """The browser end of the socket; remembers when it went away so answers can still finish."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.connected = True

    async def send(self, frame: frames.Frame) -> None:
        if not self.connected:
            return
        try:
            await self.websocket.send_text(frames.encode(frame))
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.connected = False


async def chat_socket(websocket: WebSocket) -> None:
    """One browser session: read frames, answer each message, until the browser disconnects."""
    runtime: Runtime = websocket.app.state.runtime
    session = websocket.query_params.get("session")
    await websocket.accept()
    peer = _Peer(websocket)
    if session is None:
        session = frames.new_session_id()
        await peer.send(frames.session_frame(session))
    elif not frames.valid_session_id(session):
        await peer.send(frames.error_frame(frames.bad_session()))
        await websocket.close(code=1008)
        return
    context = {"conversation": f"{frames.CHANNEL}:{session}"}
    log.info("web chat connected", extra=context)
    input_limit = runtime.settings.max_input_chars
    while peer.connected:
        try:
            event = await websocket.receive()
        except (WebSocketDisconnect, RuntimeError):
            break
        if event["type"] == "websocket.disconnect":
            break
        raw = event.get("text")
        if raw is None:
            raw = event.get("bytes") or b""
        try:
            message = frames.to_inbound(session, frames.decode_frame(raw, input_limit=input_limit))
        except frames.FrameError as error:
            log.info("refused a web chat frame: %s", error.code, extra=context)
            await peer.send(frames.error_frame(error))
            continue
        await _answer(runtime, peer, message)
    log.info("web chat disconnected", extra=context)
    if websocket.client_state == WebSocketState.CONNECTED and peer.connected:
        with contextlib.suppress(RuntimeError, OSError):  # the other end closed at the same moment
            await websocket.close()


async def _answer(runtime: Runtime, peer: _Peer, message: InboundMessage) -> None:
    extra = {"conversation": str(message.key), "message_id": message.message_id}
    try:
        async for event in runtime.engine.stream(message):
            if isinstance(event, ReplyDelta):
                await peer.send(frames.delta_frame(event, in_reply_to=message.message_id))
            elif isinstance(event, ReplyDone):
                await peer.send(frames.reply_frame(event))
    except Exception:
        # The engine contains its own failures; this is the last line so one message never ends
        # the session.
        log.error("web chat message failed", exc_info=True, extra=extra)
        await peer.send(
            frames.error_frame(
                frames.FrameError(
                    "failed", fixed_text("apology", message.language), language=message.language
                )
            )
        )
    if not peer.connected:
        log.info("browser left before the answer was delivered", extra=extra)


routes: list[BaseRoute] = [
    Route("/", chat_page, methods=["GET"]),
    WebSocketRoute("/ws", chat_socket),
]
