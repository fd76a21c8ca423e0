"""`kefu worker` as its own process: answers from the shared Redis inbox, stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as redis

from adapters.webchat import to_inbound, topic
from core.db.database import Database
from core.db.migrate import upgrade_async
from core.demo import seed_demo
from core.inbox.redis import RedisInbox
from core.intake import Intake
from core.stores.redis import RedisStore

REDIS_URL = "redis://127.0.0.1:6379/12"
SESSION = "worker-command-session"

pytestmark = pytest.mark.redis


async def test_kefu_worker_answers_from_the_shared_inbox(tmp_path: Path) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    await client.flushdb()
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'kefu.db'}"
    await upgrade_async(db_url)
    async with Database(url=db_url) as db:
        await seed_demo(db)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KEFU_")},
        "KEFU_DATABASE_URL": db_url,
        "KEFU_REDIS_URL": REDIS_URL,
        # No model server: a FAQ question is answered from the FAQ cache, anything else by the fallback.
        "KEFU_LLM_BACKEND": "ollama",
        "KEFU_OLLAMA_HOST": "http://127.0.0.1:9",
        "KEFU_FAQ_EMBEDDINGS": "false",
        "KEFU_SCHEDULER_ENABLED": "false",
    }
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bots.cli", "worker", cwd=tmp_path, env=env, stderr=subprocess.DEVNULL
    )
    try:
        async with (
            RedisStore(url=REDIS_URL) as store,
            RedisInbox(url=REDIS_URL) as inbox,
            store.subscribe(topic(SESSION)) as subscription,
        ):
            message = to_inbound(SESSION, {"type": "message", "id": "c1", "text": "下单后多久发货？"})
            await Intake(store=store, inbox=inbox).accept(message)
            reply = None
            for _ in range(240):
                frame = await subscription.get(wait=0.5)
                if frame is not None and json.loads(frame).get("type") == "reply":
                    reply = json.loads(frame)
                    break
                assert worker.returncode is None, "the worker process exited"
        assert reply is not None and "48 小时" in reply["text"]
    finally:
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(worker.wait(), 60)
        await client.flushdb()
        await client.aclose()
    assert code == 0


def test_kefu_worker_refuses_to_run_without_redis(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEFU_")}
    result = subprocess.run(
        [sys.executable, "-m", "bots.cli", "worker"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "KEFU_REDIS_URL" in result.stderr
