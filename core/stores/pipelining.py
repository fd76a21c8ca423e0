"""Automatic pipelining: concurrent Redis commands share one round trip.

redis-py sends each command on its own: a connection is checked out, the command written, the reply
awaited and parsed, the connection returned. On the intake's hot path (a Lua admission and an XADD per
webhook) that machinery cost more CPU than the rest of accepting a message. A :class:`Pipeliner`
queues the commands issued while one batch is in flight and sends them together as the next pipeline
(no MULTI: each command stays independent), so under load a round trip carries dozens of them, and a
lone command still goes out at once.

Replies keep their command's own outcome: an error reply (a missing script, a wrong type) is raised to
that command's caller only; a connection failure after redis-py's retries is raised to every caller of
the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

EncodedArg = str | bytes | int | float


class Pipeliner:
    """Sends the commands given to :meth:`execute` in pipelines of at most ``max_batch``, one at a time."""

    def __init__(self, client: Redis, *, max_batch: int = 256) -> None:
        self._client = client
        self._max_batch = max_batch
        self._queue: list[tuple[tuple[EncodedArg, ...], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def execute(self, *command: EncodedArg) -> Any:
        """Run ``command`` (``"XADD", key, "*", ...``) in the next pipeline; returns its parsed reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((command, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name="redis-pipeliner")
        return await future

    async def run_script(
        self, script: AsyncScript, keys: Sequence[EncodedArg], args: Sequence[EncodedArg]
    ) -> Any:
        """``EVALSHA`` of a registered script in the next pipeline; a Redis that has forgotten it (a
        restart: scripts are not persisted) is given it again."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self.execute(*command)
        except NoScriptError:
            await self._client.script_load(script.script)
            return await self.execute(*command)

    async def _send(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                batch = [(command, future) for command, future in batch if not future.cancelled()]
                if batch:
                    await self._send_batch(batch)
        finally:
            self._sender = None

    async def _send_batch(self, batch: list[tuple[tuple[EncodedArg, ...], asyncio.Future[Any]]]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for command, _future in batch:
                    pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)
            if len(replies) != len(batch):
                raise RuntimeError(f"redis answered {len(replies)} of {len(batch)} pipelined commands")
        except asyncio.CancelledError:
            for _command, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            # Nobody may wait forever: every caller of the batch gets the failure.
            for _command, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_command, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def aclose(self) -> None:
        """Wait for the batch in flight (called before the client is closed)."""
        if self._sender is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(self._sender)
