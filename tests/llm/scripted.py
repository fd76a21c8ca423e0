"""What the fake model servers answer, and the server plumbing both fakes share.

A test queues :class:`ScriptedReply` objects; each chat request takes the next one. Each fake renders a
reply in its own wire format (Ollama NDJSON, OpenAI SSE) and records every request it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# The decoded JSON body of a request, stored by the recording middleware for the handlers.
JSON_BODY: web.RequestKey[Any] = web.RequestKey("json_body")


@dataclass
class ScriptedToolCall:
    """A tool call the fake model makes. ``raw_arguments`` (OpenAI only) is sent verbatim."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    raw_arguments: str | None = None
    id: str | None = None

    def arguments_text(self) -> str:
        if self.raw_arguments is not None:
            return self.raw_arguments
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class ScriptedReply:
    """One scripted answer.

    * ``text``: the content deltas, in order.
    * ``tool_calls``: calls sent in non-final chunks (as the real servers do).
    * ``status`` != 200: answer with that HTTP status and ``error`` as the error message.
    * ``status`` == 200 and ``error`` set: stream ``text``, then an error line/event mid-stream.
    * ``delay``: seconds before the response starts; ``chunk_delay``: seconds between chunks.
    * ``argument_pieces``: OpenAI only, split each argument string over this many SSE chunks.
    """

    text: list[str] = field(default_factory=list)
    tool_calls: list[ScriptedToolCall] = field(default_factory=list)
    prompt_tokens: int = 42
    completion_tokens: int = 7
    cached_tokens: int = 0
    finish_reason: str | None = None
    status: int = 200
    error: str | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    argument_pieces: int = 1

    @classmethod
    def answer(cls, *pieces: str, **options: Any) -> ScriptedReply:
        return cls(text=list(pieces), **options)

    @classmethod
    def call(cls, name: str, arguments: dict[str, Any], **options: Any) -> ScriptedReply:
        return cls(tool_calls=[ScriptedToolCall(name=name, arguments=arguments)], **options)

    @classmethod
    def failure(cls, status: int, error: str) -> ScriptedReply:
        return cls(status=status, error=error)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    body: Any


class ScriptedServer:
    """An aiohttp server on 127.0.0.1 (free port) with a reply queue and a request log."""

    def __init__(self) -> None:
        self.replies: deque[ScriptedReply] = deque()
        # Answers chat requests when no reply is queued (a model that keeps answering, for load tests).
        self.responder: Callable[[dict[str, Any]], ScriptedReply] | None = None
        self.requests: list[RecordedRequest] = []
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self.url = ""

    def queue(self, *replies: ScriptedReply) -> None:
        self.replies.extend(replies)

    def chat_bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies of every chat request received, oldest first."""
        return [r.body for r in self.requests if r.path.endswith(("/api/chat", "/chat/completions"))]

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    async def start(self) -> str:
        app = web.Application(middlewares=[self._record])
        app.add_routes(self.routes())
        # handler_cancellation: a client that gave up (timeout) cancels its handler at once.
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def pause(self, seconds: float) -> None:
        """Sleep, but end early when the server stops (so teardown never waits on a slow script)."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), seconds)

    def next_reply(self, body: Any = None) -> ScriptedReply | None:
        if self.replies:
            return self.replies.popleft()
        if self.responder is not None and isinstance(body, dict):
            return self.responder(body)
        return None

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                body = raw.decode("utf-8", "replace")
        self.requests.append(RecordedRequest(request.method, request.path, body))
        request[JSON_BODY] = body
        response: web.StreamResponse = await handler(request)
        return response


def split_text(text: str, pieces: int) -> list[str]:
    """``text`` cut into at most ``pieces`` consecutive parts (``[""]`` for empty text)."""
    if not text:
        return [""]
    size = -(-len(text) // max(1, min(pieces, len(text))))
    return [text[i : i + size] for i in range(0, len(text), size)]
