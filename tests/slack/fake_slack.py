"""A fake Slack for tests: the Web API (``POST /api/<method>``) and a Socket Mode WebSocket.

It speaks Slack's wire format: form or JSON request bodies, ``{"ok": true, ...}`` answers, HTTP 429
with ``Retry-After`` when scripted, ``apps.connections.open`` handing out a ``ws://`` URL on this
server, and Socket Mode envelopes over that WebSocket. Every API call and every envelope
acknowledgement is recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web


@dataclass
class ApiCall:
    method: str
    params: dict[str, Any]
    authorization: str | None


@dataclass
class Scripted:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class PostedMessage:
    channel: str
    ts: str
    thread_ts: str | None
    text: str
    edits: int = 0


class FakeSlack:
    """Start with ``await fake.start()``; ``api_base`` is what KEFU_SLACK_API_BASE points at."""

    def __init__(self) -> None:
        self.calls: list[ApiCall] = []
        self.messages: dict[str, PostedMessage] = {}
        self.acks: list[dict[str, Any]] = []
        self._script: dict[str, list[Scripted]] = {}
        self._ts = itertools.count(1)
        self._sockets: set[web.WebSocketResponse] = set()
        self._connected = asyncio.Event()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/link", self._socket)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    # -- scripting and inspection

    def script(self, method: str, *responses: Scripted) -> None:
        """The next calls of ``method`` get these answers, in order, before normal service resumes."""
        self._script.setdefault(method, []).extend(responses)

    def calls_of(self, method: str) -> list[ApiCall]:
        return [call for call in self.calls if call.method == method]

    def thread(self, channel: str, thread_ts: str | None) -> list[PostedMessage]:
        """What a user sees in a thread (or at the top of a DM when ``thread_ts`` is None)."""
        return [m for m in self.messages.values() if m.channel == channel and m.thread_ts == thread_ts]

    async def wait_until(self, condition: Callable[[], bool], *, within: float = 10.0) -> None:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(condition)

        await asyncio.wait_for(wait(), timeout=within)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- Web API

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.content_type == "application/json":
            params = await request.json()
        else:
            params = dict(await request.post())
        self.calls.append(ApiCall(method, dict(params), request.headers.get("Authorization")))
        await self._notify()
        queued = self._script.get(method)
        if queued:
            scripted = queued.pop(0)
            return web.json_response(scripted.body, status=scripted.status, headers=scripted.headers)
        handler = getattr(self, "_" + method.replace(".", "_"), None)
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method"})
        body: dict[str, Any] = handler(params)
        response = web.json_response(body)
        await self._notify()
        return response

    def _auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "user_id": "UBOT", "bot_id": "BBOT", "team_id": "T1", "user": "kefu"}

    def _apps_connections_open(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/link"}

    def _chat_postMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = params.get("channel")
        text = params.get("text")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        if not text:
            return {"ok": False, "error": "no_text"}
        ts = f"1800000000.{next(self._ts):06d}"
        thread_ts = params.get("thread_ts") or None
        self.messages[ts] = PostedMessage(channel=channel, ts=ts, thread_ts=thread_ts, text=text)
        message = {"type": "message", "text": text, "bot_id": "BBOT", "ts": ts}
        return {"ok": True, "channel": channel, "ts": ts, "message": message}

    def _chat_update(self, params: dict[str, Any]) -> dict[str, Any]:
        posted = self.messages.get(params.get("ts", ""))
        if posted is None or posted.channel != params.get("channel"):
            return {"ok": False, "error": "message_not_found"}
        if not params.get("text"):
            return {"ok": False, "error": "no_text"}
        posted.text = params["text"]
        posted.edits += 1
        return {"ok": True, "channel": posted.channel, "ts": posted.ts, "text": posted.text}

    # -- Socket Mode

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.add(ws)
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1, "debug_info": {}}))
        self._connected.set()
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    self.acks.append(json.loads(message.data))
                    await self._notify()
        finally:
            self._sockets.discard(ws)
        return ws

    async def wait_connected(self, within: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout=within)

    async def push(self, envelope: dict[str, Any]) -> None:
        """Send a Socket Mode envelope to the connected app."""
        for ws in list(self._sockets):
            await ws.send_str(json.dumps(envelope))
