"""Models for tests and benchmarks: answers come from a Python function, not from a model server.

``FunctionModel(fn)`` calls ``fn(request)`` for every request; ``fn`` returns a ChatResponse, a plain
string (the answer), or raises an LLMError to simulate an outage. Streaming splits the answer into
word-sized deltas. Like pydantic-ai's FunctionModel, it exercises the whole engine without inference.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable

from core.llm.base import ChatChunk, ChatModel, ChatRequest, ChatResponse, ModelInfo, Usage

Responder = Callable[[ChatRequest], "ChatResponse | str | Awaitable[ChatResponse | str]"]

_PIECES = re.compile(r"\S+\s*|\s+")


class FunctionModel(ChatModel):
    """A ChatModel whose answers come from ``fn``; ``requests`` records every request it got."""

    name = "function"

    def __init__(self, fn: Responder, *, delay: float = 0.0) -> None:
        self._fn = fn
        self._delay = delay
        self.requests: list[ChatRequest] = []

    async def _respond(self, request: ChatRequest) -> ChatResponse:
        self.requests.append(request)
        if self._delay:
            await asyncio.sleep(self._delay)
        result = self._fn(request)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, str):
            prompt_chars = sum(len(m.content) for m in request.messages)
            result = ChatResponse(
                content=result,
                usage=Usage(prompt_tokens=prompt_chars // 2, completion_tokens=len(result) // 2),
                finish_reason="stop",
            )
        return result

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        response = await self._respond(request)
        if not response.tool_calls:
            for piece in _PIECES.findall(response.content):
                yield ChatChunk(delta=piece)
        yield ChatChunk(done=True, response=response)

    async def info(self) -> ModelInfo:
        return ModelInfo(backend=self.name, model="function", reachable=True, loaded=True)


def echo(request: ChatRequest) -> str:
    """Answers with the last customer message: a fast model for load tests."""
    for message in reversed(request.messages):
        if message.role == "user":
            return f"echo: {message.content}"
    return "echo"
