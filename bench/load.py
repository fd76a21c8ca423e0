"""Load test on loopback: Telegram webhooks into `kefu serve` (Redis, PostgreSQL, a fast scripted model).

Starts the real gateway in a child process (uvicorn, the app `kefu serve` runs, with KEFU_SERVE_WORKER
off) and ``--workers`` `kefu worker` processes with an instant echo model instead of inference, a fake
Telegram Bot API in this process that records every sendMessage, and fires a burst of signed webhook
updates at the gateway from many concurrent clients (aiohttp). A bare echo endpoint on the same ASGI
server with the same load is the ceiling. Prints:

- inbound messages per second accepted during the burst (webhook POST → 200, durably queued) with
  p50/p99 accept latency, against the ceiling: for the first half of the burst with no worker running
  (the gateway alone, like the echo server), for the second half while the workers answer the first
  (they share the cores);
- how fast the workers answered the burst (at most 30 a second: Telegram's limit for one bot, which
  all workers of the bot keep together), and lost / duplicated answers (each answer must reach the
  fake API exactly once, as a new message or as the final edit of a streamed draft);
- end-to-end latency (POST → sendMessage) p50/p99 at a steady rate the workers keep up with.

    python bench/load.py [--messages 3000] [--chats 1500] [--concurrency 64] [--workers 1]

Needs Redis at 127.0.0.1:6379 and PostgreSQL at 127.0.0.1:5432 (a scratch database is created and
dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "7098765432:AAH-load_test_token_for_kefu_0123456789"
SECRET = "load-test-secret"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/11"  # a database of its own, emptied before and after


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the server side (child process) ----------------------------------------------------------------


def _settings(api_base: str, database_url: str) -> Any:
    from core.settings import load_settings

    return load_settings(
        _env_file=None,
        database_url=database_url,
        redis_url=REDIS_URL,
        telegram_token=TOKEN,
        telegram_webhook_secret=SECRET,
        telegram_api_base=api_base,
        faq_embeddings=False,
        scheduler_enabled=False,
        rate_limit_per_minute=0,
        conversation_rate_limit_per_minute=0,
        serve_worker=False,  # the workers run in processes of their own, as in docker-compose.yml
        log_level="WARNING",
    )


def serve(mode: str, port: str, api_base: str, database_url: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    if mode == "echo":

        async def echo(request: Request) -> Response:
            json.loads(await request.body())
            return Response("ok")

        app: Any = Starlette(routes=[Route("/telegram/webhook", echo, methods=["POST"])])
    else:
        from bots.gateway import create_app

        app = create_app(_settings(api_base, database_url))
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning", access_log=False)


def work(api_base: str, database_url: str) -> None:
    """`kefu worker` with the instant echo model instead of inference."""
    import signal

    from bots import platforms
    from bots.cli_support import run as run_like_the_cli
    from core.llm.testing import FunctionModel
    from core.llm.testing import echo as echo_model
    from core.runtime import Runtime

    settings = _settings(api_base, database_url)

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        model = FunctionModel(echo_model)
        async with (
            Runtime.open(settings, model=model) as runtime,
            platforms.running(settings, runtime, receivers=False),
        ):
            await stop.wait()

    run_like_the_cli(run())


# --- the load side ----------------------------------------------------------------------------------


class FakeTelegram:
    """Answers the Bot API methods the sender uses; records when each answer arrives."""

    def __init__(self) -> None:
        self.arrivals: dict[str, list[float]] = {}
        self._next = 1

    async def handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params: dict[str, Any] = (
            dict(await request.post()) if request.content_type != "application/json" else await request.json()
        )
        result: Any = True
        if method == "getMe":
            result = {"id": 7098765432, "is_bot": True, "first_name": "kefu", "username": "kefu_load_bot"}
        elif method in ("sendMessage", "editMessageText"):
            text = str(params.get("text", ""))
            self.record(int(params.get("chat_id", 0)), text)
            self._next += 1
            result = {
                "message_id": self._next,
                "date": int(time.time()),
                "chat": {"id": int(params.get("chat_id", 0)), "type": "private"},
                "text": text,
            }
        return web.json_response({"ok": True, "result": result})

    def record(self, chat: int, text: str) -> None:
        # A slow answer is shown as a draft first and edited into its final text: the answer has
        # arrived when its final text appears, by either method.
        self.arrivals.setdefault(text, []).append(time.perf_counter())


@contextlib.asynccontextmanager
async def scratch_services() -> AsyncIterator[str]:
    """A scratch PostgreSQL database (yields its URL) and an empty Redis database, both cleared after."""
    import redis.asyncio as redis

    name = f"kefu_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    client = redis.Redis.from_url(REDIS_URL)
    await client.flushdb()
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        await client.flushdb()
        await client.aclose()


async def start_bot_api(handle: Any) -> tuple[web.AppRunner, str]:
    """Serve ``handle`` as the Bot API methods on a free port; returns the runner and the base URL."""
    app = web.Application()
    app.router.add_post("/bot{token}/{method}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def update(update_id: int, chat: int, text: str) -> dict[str, Any]:
    person = {"id": chat, "is_bot": False, "first_name": "Load", "language_code": "en"}
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": int(time.time()),
            "chat": {"id": chat, "type": "private", "first_name": "Load"},
            "from": person,
            "text": text,
        },
    }


async def wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError("the server process exited")
            try:
                if (await client.get(url)).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} never answered")


async def fire(
    port: int, messages: int, chats: int, concurrency: int, run: str, first_id: int = 1
) -> tuple[float, list[float], dict[str, float], int]:
    """POST every update; returns (seconds, accept latencies, send time per expected answer, non-2xx)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(messages):
        queue.put_nowait(n)
    accept: list[float] = []
    sent_at: dict[str, float] = {}
    failures = 0
    url = f"http://127.0.0.1:{port}/telegram/webhook"
    headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"}

    async def client_loop(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while not queue.empty():
            n = queue.get_nowait()
            text = f"{run} message {n}"
            body = json.dumps(update(first_id + n, 10_000 + n % chats, text)).encode()
            started = time.perf_counter()
            sent_at[f"echo: {text}"] = started
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status >= 300:
                    failures += 1
            accept.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return elapsed, accept, sent_at, failures


async def burst(
    port: int, messages: int, chats: int, concurrency: int, run: str, first_id: int = 1
) -> tuple[dict[str, float], dict[str, float]]:
    """:func:`fire`, summed up: (rate and accept latencies, send time per expected answer)."""
    elapsed, accept, sent_at, failures = await fire(port, messages, chats, concurrency, run, first_id)
    row = {
        "rate": messages / elapsed,
        "accept_p50": pct(accept, 0.5),
        "accept_p99": pct(accept, 0.99),
        "non_2xx": float(failures),
    }
    return row, sent_at


async def paced(port: int, messages: int, rate: float, run: str) -> dict[str, float]:
    """POST ``messages`` updates at ``rate`` per second (a new chat each); returns send time per answer."""
    url = f"http://127.0.0.1:{port}/telegram/webhook"
    headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"}
    sent_at: dict[str, float] = {}

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        text = f"{run} message {n}"
        body = json.dumps(update(1_000_000 + n, 900_000 + n, text)).encode()
        sent_at[f"echo: {text}"] = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        tasks = []
        for n in range(messages):
            await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session, n)))
        await asyncio.gather(*tasks)
    return sent_at


async def drain(fake: FakeTelegram, sent_at: dict[str, float], within: float) -> None:
    deadline = time.perf_counter() + within
    while time.perf_counter() < deadline and any(t not in fake.arrivals for t in sent_at):
        await asyncio.sleep(0.1)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def measure(
    args: argparse.Namespace,
    fake: FakeTelegram,
    fake_api: str,
    database_url: str,
    workdir: str,
    results: dict[str, dict[str, float]],
) -> None:
    """The echo burst, then the kefu bursts, the drain and the paced run; fills ``results``."""
    for mode in ("echo", "kefu"):
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                mode,
                str(port),
                fake_api,
                database_url,
            ],
            cwd=workdir,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        workers: list[subprocess.Popen[bytes]] = []
        try:
            await wait_healthy(
                f"http://127.0.0.1:{port}/" + ("healthz" if mode == "kefu" else "telegram/webhook"), proc
            )
            if mode == "echo":
                results["echo"], _ = await burst(port, args.messages, args.chats, args.concurrency, "echo")
                continue
            # Half the burst with no worker running: the gateway alone, as the echo server is.
            half = args.messages // 2
            results["alone"], first_sent = await burst(port, half, args.chats, args.concurrency, "alone")
            workers = [
                subprocess.Popen(
                    [sys.executable, __file__, "--work", fake_api, database_url],
                    cwd=workdir,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
                for _ in range(args.workers)
            ]
            await asyncio.sleep(args.worker_start)
            # The other half while the workers answer the first: they share the cores.
            row, second_sent = await burst(
                port, args.messages - half, args.chats, args.concurrency, "shared", first_id=half + 1
            )
            sent_at = first_sent | second_sent
            await drain(fake, sent_at, args.drain_timeout)
            answered = [fake.arrivals[t][0] - sent_at[t] for t in sent_at if t in fake.arrivals]
            counts = Counter(len(fake.arrivals.get(t, [])) for t in sent_at)
            last = max((fake.arrivals[t][0] for t in sent_at if t in fake.arrivals), default=0.0)
            first = min((fake.arrivals[t][0] for t in sent_at if t in fake.arrivals), default=0.0)
            # End to end at a steady rate the workers keep up with (the burst only queues), once the
            # burst's last second of Telegram's send budget (30 a second per bot) is over.
            await asyncio.sleep(2)
            steady = await paced(port, args.paced, args.paced_rate, "paced")
            await drain(fake, steady, 60)
            latencies = [fake.arrivals[t][0] - steady[t] for t in steady if t in fake.arrivals]
            row |= {
                "e2e_p50": pct(latencies, 0.5) if latencies else float("nan"),
                "e2e_p99": pct(latencies, 0.99) if latencies else float("nan"),
                "lost": float(counts.get(0, 0) + sum(1 for t in steady if t not in fake.arrivals)),
                "duplicated": float(
                    sum(max(0, len(fake.arrivals.get(t, [])) - 1) for t in [*sent_at, *steady])
                ),
                "answered_rate": len(answered) / (last - first) if last > first else 0.0,
            }
            results["shared"] = row
        finally:
            for child in [proc, *workers]:
                child.terminate()
            for child in [proc, *workers]:
                child.wait(timeout=60)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--chats", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="`kefu worker` processes answering")
    parser.add_argument("--worker-start", type=float, default=8.0, help="seconds the workers get to start")
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--paced", type=int, default=200, help="messages sent at a steady rate afterwards")
    parser.add_argument("--paced-rate", type=float, default=20.0, help="their rate, messages per second")
    args = parser.parse_args()

    fake = FakeTelegram()
    runner, fake_api = await start_bot_api(fake.handle)

    results: dict[str, dict[str, float]] = {}
    workdir = tempfile.mkdtemp(prefix="kefu-bench-")  # the server's kefu.key goes here
    try:
        async with scratch_services() as database_url:
            await measure(args, fake, fake_api, database_url, workdir, results)
    finally:
        await runner.cleanup()

    echo, alone, shared = results["echo"], results["alone"], results["shared"]
    print(
        f"{args.messages} Telegram webhook updates, {args.chats} chats, {args.concurrency} concurrent clients"
    )
    print(f"{'endpoint':<36} {'msgs/s':>8} {'ceiling':>8} {'accept p50':>11} {'accept p99':>11}")
    for name, row in (
        ("bare echo (ceiling)", echo),
        ("kefu serve, no worker running", alone),
        (f"kefu serve, {args.workers} worker(s) answering", shared),
    ):
        print(
            f"{name:<36} {row['rate']:>8.0f} {row['rate'] / echo['rate']:>8.0%} "
            f"{row['accept_p50']:>9.1f}ms {row['accept_p99']:>9.1f}ms"
        )
    print(f"non-2xx answers from kefu: {alone['non_2xx'] + shared['non_2xx']:.0f}")
    print(
        f"the burst was answered at {shared['answered_rate']:.0f} msgs/s by {args.workers} kefu worker "
        f"process(es); lost {shared['lost']:.0f}, duplicated {shared['duplicated']:.0f}"
    )
    print(
        f"end to end at a steady {args.paced_rate:g} msgs/s (POST → sendMessage): "
        f"p50 {shared['e2e_p50']:.0f} ms, p99 {shared['e2e_p99']:.0f} ms"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(*sys.argv[2:6])
    elif len(sys.argv) > 1 and sys.argv[1] == "--work":
        work(*sys.argv[2:4])
    else:
        asyncio.run(main())
