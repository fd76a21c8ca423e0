"""Scale-out with real processes: two `kefu serve` gateways and two `kefu worker` processes share one Redis
and one PostgreSQL. Telegram delivers every update three times (its retries), each time to a random
gateway; every message is still answered exactly once, and each conversation in the order it was sent.

The platform is a local Bot API server (tests.telegram) and the model a local Ollama server
(tests.llm) that answers every request at once, so the run measures kefu, not inference.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.llm.fake_ollama import FakeOllama
from tests.llm.scripted import ScriptedReply
from tests.reliability.conftest import RedisServer, free_port
from tests.telegram.conftest import SECRET, TOKEN, FakeBotAPI, private_message, running_fake

ROOT = Path(__file__).resolve().parents[2]
CONVERSATIONS = 100
PER_CONVERSATION = 10
DELIVERIES = 3
FIRST_CHAT = 5_000_000

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


def echo_answer(body: dict[str, Any]) -> ScriptedReply:
    """Answers the customer's latest message (summary requests get an answer too, never shown)."""
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return ScriptedReply.answer(f"answer to {users[-1]['content'] if users else ''}")


def text_of(chat: int, n: int) -> str:
    return f"chat {chat} message {n}"


class Processes:
    """`kefu serve` and `kefu worker` processes with one environment; logs go to files."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, name: str, *args: str) -> None:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bots.cli", *args, cwd=self.logs, env=self.env, stdout=log, stderr=log
            )
        self.procs.append(proc)

    def exited(self) -> list[str]:
        return [str(p.returncode) for p in self.procs if p.returncode is not None]

    async def stop(self) -> list[int | None]:
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self.procs:
            try:
                codes.append(await asyncio.wait_for(proc.wait(), 40))
            except TimeoutError:
                proc.kill()
                codes.append(await proc.wait())
        return codes


async def wait_ready(session: aiohttp.ClientSession, url: str, processes: Processes) -> None:
    for _ in range(600):
        assert not processes.exited(), f"a kefu process exited: see {processes.logs}"
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


def answers(fake: FakeBotAPI, chat: int) -> list[str]:
    """What the customer in ``chat`` sees from the bot, oldest first."""
    return fake.chat_texts(chat)


async def test_two_gateways_two_workers_triple_delivery_answer_each_message_once_in_order(
    tmp_path: Path, pg_url: str
) -> None:
    redis = RedisServer(tmp_path, persistent=False)
    await redis.start()
    ollama = FakeOllama()
    ollama.responder = echo_answer
    await ollama.start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KEFU_")},
        "KEFU_DATABASE_URL": pg_url,
        "KEFU_REDIS_URL": redis.url,
        "KEFU_LLM_BACKEND": "ollama",
        "KEFU_OLLAMA_HOST": ollama.url,
        "KEFU_TELEGRAM_TOKEN": TOKEN,
        "KEFU_TELEGRAM_WEBHOOK_SECRET": SECRET,
        "KEFU_FAQ_EMBEDDINGS": "false",
        "KEFU_SCHEDULER_ENABLED": "false",
        "KEFU_SERVE_WORKER": "false",
        "KEFU_LOG_LEVEL": "WARNING",
    }
    processes = Processes(env, tmp_path)
    sends: Counter[int] = Counter()
    try:
        async with running_fake() as fake, aiohttp.ClientSession() as session:
            env["KEFU_TELEGRAM_API_BASE"] = fake.url
            ports = [free_port(), free_port()]
            for i, port in enumerate(ports):
                await processes.start(f"gateway-{i}", "serve", "--port", str(port))
            for i in range(2):
                await processes.start(f"worker-{i}", "worker")
            for port in ports:
                await wait_ready(session, f"http://127.0.0.1:{port}/readyz", processes)

            async def deliver(update: dict[str, Any]) -> None:
                """One delivery attempt to a random gateway; Telegram resends until it gets a 2xx."""
                port = random.choice(ports)
                headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
                url = f"http://127.0.0.1:{port}/telegram/webhook"
                async with session.post(url, json=update, headers=headers) as response:
                    assert response.status == 200, await response.text()
                sends[update["update_id"]] += 1

            async def customer(index: int) -> None:
                chat = FIRST_CHAT + index
                for n in range(PER_CONVERSATION):
                    update = private_message(index * PER_CONVERSATION + n + 1, text_of(chat, n), chat_id=chat)
                    # The same update three times, at once, to random gateways: the first copy accepted
                    # queues the message; the customer's next message comes after Telegram's 200s.
                    await asyncio.gather(*(deliver(update) for _ in range(DELIVERIES)))
                    await asyncio.sleep(random.uniform(0, 0.05))

            began = time.monotonic()
            await asyncio.gather(*(customer(i) for i in range(CONVERSATIONS)))
            accepted = time.monotonic() - began
            total = CONVERSATIONS * PER_CONVERSATION
            chats = [FIRST_CHAT + i for i in range(CONVERSATIONS)]
            deadline = time.monotonic() + 240
            while sum(len(answers(fake, c)) for c in chats) < total and time.monotonic() < deadline:
                assert not processes.exited(), f"a kefu process exited: see {tmp_path}"
                await asyncio.sleep(0.2)
            answered = time.monotonic() - began
            await asyncio.sleep(2.0)  # a second answer to anything would arrive by now
            print(
                f"{total} messages x {DELIVERIES} deliveries accepted in {accepted:.1f}s, "
                f"answered in {answered:.1f}s"
            )
            seen = {c: answers(fake, c) for c in chats}
    finally:
        codes = await processes.stop()
        await ollama.stop()
        await redis.kill()

    assert sum(sends.values()) == total * DELIVERIES
    for chat in chats:
        assert seen[chat] == [f"answer to {text_of(chat, n)}" for n in range(PER_CONVERSATION)], chat
    assert codes == [0, 0, 0, 0], f"unclean exits: see {tmp_path}"
