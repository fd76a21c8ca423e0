"""A bound on the model calls one process runs at once.

The model server is the scarce resource: more parallel requests than it runs only queue there (Ollama
answers 503 once ``OLLAMA_MAX_QUEUE`` is full) and make every answer slower. :class:`BoundedModel` wraps
any backend; a call waits for a free slot before it reaches the server and holds it until its stream
ends. The worker's other waits (conversation order, locks, delivery) hold no slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from core.llm.base import ChatChunk, ChatModel, ChatRequest, ModelInfo


class BoundedModel(ChatModel):
    """``model``, with at most ``limit`` calls in flight; closing it closes ``model``."""

    def __init__(self, model: ChatModel, *, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.inner = model
        self.name = model.name
        self.limit = limit
        self._slots = asyncio.Semaphore(limit)
        self.in_flight = 0

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """The inner model's stream, started once a slot is free."""
        async with self._slots:
            self.in_flight += 1
            try:
                async for chunk in self.inner.stream(request):
                    yield chunk
            finally:
                self.in_flight -= 1

    def count_tokens(self, text: str) -> int:
        """The inner model's token count (no slot needed: it never reaches the server)."""
        return self.inner.count_tokens(text)

    async def info(self) -> ModelInfo:
        return await self.inner.info()

    async def aclose(self) -> None:
        await self.inner.aclose()
