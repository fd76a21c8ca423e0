"""FAQ cache answers through the whole path: Telegram webhook in → reply at the Bot API, p50/p99.

Starts the gateway and one `kefu worker` the way bench/load.py does (Redis, PostgreSQL, the demo FAQ
seeded, an echo model that must never be needed), a fake Telegram Bot API in this process, and sends
customer variants of the demo FAQ questions (traditional characters, full-width letters, punctuation) as
signed webhook updates, one chat each, at a steady rate. Every answer must be the FAQ entry's answer
from the cache; the time from the POST to the sendMessage arriving at the fake API is the latency.

    python bench/faq_path.py [--messages 300] [--rate 20]

Needs Redis at 127.0.0.1:6379 and PostgreSQL at 127.0.0.1:5432 (a scratch database is created and
dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.faq_cache import demo_entries, pct, variants
from bench.load import (
    SECRET,
    FakeTelegram,
    free_port,
    scratch_services,
    start_bot_api,
    update,
    wait_healthy,
)
from core.db.database import Database
from core.db.migrate import upgrade_async
from core.demo import seed_demo
from core.handoff_intent import wants_human

LOAD = str(Path(__file__).resolve().parent / "load.py")
ROOT = Path(__file__).resolve().parents[1]


class Recorder(FakeTelegram):
    """The Bot API of bench/load.py, recording when each chat got its first message, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.replies: dict[int, tuple[float, str]] = {}

    def record(self, chat: int, text: str) -> None:
        self.replies.setdefault(chat, (time.perf_counter(), text))


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second")
    parser.add_argument("--warmup", type=int, default=60, help="questions sent first, not measured")
    args = parser.parse_args()

    recorder = Recorder()
    runner, fake_api = await start_bot_api(recorder.handle)

    workdir = tempfile.mkdtemp(prefix="kefu-bench-")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[bytes]] = []
    # Asking for a person is answered with a hand-off, not from the cache.
    questions = [(text, lang) for text, lang in variants(demo_entries()) if not wants_human(text, {})]
    known = {e.answer for e in demo_entries()}
    try:
        async with scratch_services() as database_url:
            try:
                await upgrade_async(database_url)
                async with Database(url=database_url) as db:
                    await seed_demo(db)
                port = free_port()
                procs.append(
                    subprocess.Popen(
                        [sys.executable, LOAD, "--serve", "kefu", str(port), fake_api, database_url],
                        cwd=workdir,
                        env=env,
                    )
                )
                await wait_healthy(f"http://127.0.0.1:{port}/healthz", procs[0])
                procs.append(
                    subprocess.Popen(
                        [sys.executable, LOAD, "--work", fake_api, database_url], cwd=workdir, env=env
                    )
                )
                url = f"http://127.0.0.1:{port}/telegram/webhook"
                headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"}
                sent: dict[int, float] = {}
                accepted: dict[int, float] = {}

                async def ask(session: aiohttp.ClientSession, n: int, text: str) -> None:
                    chat = 500_000 + n
                    body = json.dumps(update(n + 1, chat, text)).encode()
                    sent[chat] = time.perf_counter()
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                    accepted[chat] = time.perf_counter()

                async with aiohttp.ClientSession() as session:
                    # Warm up until the worker answers from the cache (it fills the cache when it starts).
                    for n in range(600):
                        await ask(session, 10_000_000 + n, questions[0][0])
                        await asyncio.sleep(0.1)
                        if recorder.replies.get(500_000 + 10_000_000 + n, (0, ""))[1] in known:
                            break
                    else:
                        raise RuntimeError("the worker never answered from the FAQ cache")
                    # Then a few seconds of the same traffic, not measured: each pooled database connection
                    # prepares its statements on first use, which is start-up, not the steady state.
                    for n in range(args.warmup):
                        await ask(session, 10_100_000 + n, questions[n % len(questions)][0])
                        await asyncio.sleep(1 / args.rate)
                    started = time.perf_counter()
                    tasks = []
                    for n in range(args.messages):
                        await asyncio.sleep(max(0.0, started + n / args.rate - time.perf_counter()))
                        tasks.append(asyncio.create_task(ask(session, n, questions[n % len(questions)][0])))
                    await asyncio.gather(*tasks)
                deadline = time.perf_counter() + 60
                chats = [500_000 + n for n in range(args.messages)]
                while time.perf_counter() < deadline and any(c not in recorder.replies for c in chats):
                    await asyncio.sleep(0.05)
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait(timeout=60)
    finally:
        await runner.cleanup()

    latencies = [(recorder.replies[c][0] - sent[c]) * 1000 for c in chats if c in recorder.replies]
    from_cache = sum(1 for c in chats if c in recorder.replies and recorder.replies[c][1] in known)
    print(f"{args.messages} FAQ questions at {args.rate:g}/s, one chat each, gateway + 1 worker process")
    print(f"answered {len(latencies)}, from the FAQ cache {from_cache}")
    if latencies:
        p50, p99 = pct(latencies, 0.5), pct(latencies, 0.99)
        print(f"webhook in → reply at the Bot API: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        accepts = [(accepted[c] - sent[c]) * 1000 for c in chats if c in accepted]
        p50, p99 = pct(accepts, 0.5), pct(accepts, 0.99)
        print(f"  of which the webhook's 200 answer: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    for chat in chats:
        if chat in recorder.replies and recorder.replies[chat][1] not in known:
            print("not from the cache:", questions[chat - 500_000][0], "→", recorder.replies[chat][1][:70])


if __name__ == "__main__":
    asyncio.run(main())
