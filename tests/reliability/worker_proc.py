"""One worker process for the crash test: Redis inbox and store, PostgreSQL, a slow scripted model.

Run as ``python -m tests.reliability.worker_proc --redis URL --prefix P --db URL --consumer NAME``.
Every reply is recorded with RPUSH on ``{prefix}deliveries`` (what a platform would have shown), and
while the model "thinks" the key ``{prefix}answering:{pid}`` holds the time it started, so the test can
kill the process in the middle of an answer. SIGTERM stops it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time

from redis.asyncio import Redis

from core.context import ContextBudget, ContextBuilder
from core.conversations import ConversationStore
from core.db.database import Database
from core.delivery import ReplySender, SenderRegistry
from core.engine import Engine, EngineLimits
from core.inbox.redis import RedisInbox
from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from core.messages import Reply
from core.stores.redis import RedisStore
from core.worker import Worker
from tools.registry import ToolRegistry


class ListSender(ReplySender):
    """Records each reply in a Redis list shared with the test."""

    channel = "test"

    def __init__(self, client: Redis, key: str) -> None:
        self._client = client
        self._key = key

    async def send(self, reply: Reply) -> None:
        record = {"chat": reply.key.chat_id, "reply_to": reply.in_reply_to, "text": reply.text}
        await self._client.rpush(self._key, json.dumps(record))


async def main(args: argparse.Namespace) -> None:
    client = Redis.from_url(args.redis, decode_responses=True)
    marker = f"{args.prefix}answering:{os.getpid()}"

    async def think(request: ChatRequest) -> str:
        await client.set(marker, str(time.time()))
        await asyncio.sleep(args.delay)
        await client.delete(marker)
        return f"answer to {request.messages[-1].content}"

    model = FunctionModel(think)
    async with (
        Database(url=args.db) as db,
        RedisStore(url=args.redis, prefix=args.prefix) as store,
        RedisInbox(url=args.redis, stream=f"{args.prefix}inbox", dead_stream=f"{args.prefix}dead") as inbox,
    ):
        engine = Engine(
            conversations=ConversationStore(db=db),
            store=store,
            model=model,
            tools=ToolRegistry(),
            system_prompt="S",
            context=ContextBuilder(counter=model.count_tokens, budget=ContextBudget()),
            limits=EngineLimits(lock_ttl=1.0),
        )
        worker = Worker(
            inbox=inbox,
            engine=engine,
            senders=SenderRegistry([ListSender(client, f"{args.prefix}deliveries")]),
            store=store,
            consumer=args.consumer,
            concurrency=1,
            reclaim_idle=1.0,
            lock_ttl=1.0,
        )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(worker.stop()))
        await worker.run()
    await client.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--consumer", required=True)
    parser.add_argument("--delay", type=float, default=0.05)
    asyncio.run(main(parser.parse_args()))
