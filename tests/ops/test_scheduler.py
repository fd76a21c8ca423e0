"""The scheduler on real Redis: one leader among several processes, take-over when the leader stops, dies
or loses its lock, contained job failures, and ``kefu jobs``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bots.jobs_cli import jobs_app
from core import metrics
from core.scheduler import LEADER_LOCK, Job, JobResult, Scheduler, read_job_statuses, read_leader
from core.stores.redis import RedisStore
from tests.ops.conftest import REDIS_URL, drop_keys, eventually

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]
FAST = {"lock_ttl": 1.5, "retry_interval": 0.1, "stop_grace": 1.0}


def ticking(store: RedisStore, identity: str, *, interval: float = 0.05) -> Scheduler:
    """A scheduler whose one job counts its runs under ``ticks:<identity>`` in the shared store."""

    async def tick() -> JobResult:
        return {"ticks": await store.incr(f"ticks:{identity}")}

    return Scheduler(store=store, jobs=[Job("tick", tick, interval, "count")], identity=identity, **FAST)


async def ticks(store: RedisStore, identity: str) -> int:
    return int(await store.get(f"ticks:{identity}") or 0)


async def test_one_of_several_processes_leads_and_another_takes_over_when_it_stops(
    open_store: Callable[[], RedisStore],
) -> None:
    stores = {name: open_store() for name in ("a", "b", "c")}
    schedulers = {name: ticking(store, name) for name, store in stores.items()}
    tasks = [asyncio.create_task(s.run()) for s in schedulers.values()]
    shared = stores["a"]
    try:

        async def some_ticks() -> bool:
            return sum([await ticks(shared, name) for name in stores]) >= 5

        await eventually(some_ticks)
        leaders = [name for name, s in schedulers.items() if s.is_leader]
        assert len(leaders) == 1
        first = leaders[0]
        assert [name for name in stores if await ticks(shared, name)] == [first]
        assert await read_leader(shared) == first

        await schedulers[first].stop()
        stopped_at = await ticks(shared, first)

        async def someone_else_leads() -> bool:
            return any(s.is_leader for name, s in schedulers.items() if name != first)

        await eventually(someone_else_leads)
        second = next(name for name, s in schedulers.items() if s.is_leader)
        await eventually(lambda: _above(shared, second, 3))
        assert [name for name, s in schedulers.items() if s.is_leader] == [second]
        assert await ticks(shared, first) == stopped_at, "a stopped scheduler ran a job"
        assert await read_leader(shared) == second
    finally:
        for s in schedulers.values():
            await s.stop()
        await asyncio.gather(*tasks)


async def _above(store: RedisStore, identity: str, count: int) -> bool:
    return await ticks(store, identity) >= count


DOOMED_PROCESS = """
import asyncio, sys
from core.scheduler import Job, Scheduler
from core.stores.redis import RedisStore

async def main() -> None:
    store = RedisStore(url=sys.argv[1], prefix=sys.argv[2])
    async def tick():
        return {"ticks": await store.incr("ticks:doomed")}
    scheduler = Scheduler(
        store=store, jobs=[Job("tick", tick, 0.05, "count")], identity="doomed", lock_ttl=2.0,
        retry_interval=0.1,
    )
    await scheduler.run()

asyncio.run(main())
"""


async def test_a_follower_takes_over_when_the_leader_process_is_killed(
    open_store: Callable[[], RedisStore], prefix: str
) -> None:
    store = open_store()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DOOMED_PROCESS,
        REDIS_URL,
        prefix,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    survivor = Scheduler(
        store=store,
        jobs=[Job("tick", lambda: _count(store, "survivor"), 0.05, "count")],
        identity="survivor",
        lock_ttl=2.0,
        retry_interval=0.1,
    )
    task: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: _above(store, "doomed", 3), within=20.0)
        task = asyncio.create_task(survivor.run())
        await asyncio.sleep(0.3)  # a few election rounds lost to the living leader
        assert not survivor.is_leader

        process.kill()  # SIGKILL: no chance to release the lock
        await process.wait()
        # The dead leader's lock outlives it until its TTL runs out; meanwhile nobody else leads.
        assert await store.client.pttl(store.key(f"lock:{LEADER_LOCK}")) > 0
        assert not survivor.is_leader
        dead_at = await ticks(store, "doomed")

        await eventually(lambda: _above(store, "survivor", 3))
        assert survivor.is_leader
        assert await ticks(store, "doomed") == dead_at
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await survivor.stop()
        if task is not None:
            await task


async def _count(store: RedisStore, identity: str) -> JobResult:
    return {"ticks": await store.incr(f"ticks:{identity}")}


async def test_a_leader_that_loses_its_lock_stops_running_jobs(redis_store: RedisStore) -> None:
    leader = ticking(redis_store, "first")
    task = asyncio.create_task(leader.run())
    try:
        await eventually(lambda: _above(redis_store, "first", 2))
        # Another holder has the lock now (ours expired during a network partition and was taken).
        await redis_store.client.set(redis_store.key(f"lock:{LEADER_LOCK}"), "someone-else", px=2000)
        await eventually(lambda: _not_leading(leader))
        lost_at = await ticks(redis_store, "first")
        await asyncio.sleep(0.5)  # ten job intervals
        assert await ticks(redis_store, "first") == lost_at, "jobs ran without the lock"

        # Once the other holder's lock expires, this process campaigns and leads again.
        await eventually(lambda: _leads(leader))
        await eventually(lambda: _above(redis_store, "first", lost_at + 2))
        assert leader.terms == 2
    finally:
        await leader.stop()
        await task


async def _leads(scheduler: Scheduler) -> bool:
    return scheduler.is_leader


async def _not_leading(scheduler: Scheduler) -> bool:
    return not scheduler.is_leader


async def test_a_failing_job_is_counted_and_still_runs_on_schedule(redis_store: RedisStore) -> None:
    calls = {"flaky": 0, "hung": 0}

    async def flaky() -> JobResult:
        calls["flaky"] += 1
        if calls["flaky"] <= 2:
            raise RuntimeError(f"database away (call {calls['flaky']})")
        return {"call": calls["flaky"]}

    async def hung() -> JobResult:
        calls["hung"] += 1
        await asyncio.sleep(3600)
        return {}

    before = metrics.REGISTRY.get_sample_value("kefu_job_failures_total", {"job": "flaky"}) or 0.0
    scheduler = Scheduler(
        store=redis_store,
        jobs=[
            Job("flaky", flaky, 0.05, "fails twice"),
            Job("hung", hung, 0.05, "never finishes", timeout=0.1),
        ],
        identity="solo",
        **FAST,
    )
    task = asyncio.create_task(scheduler.run())
    try:

        async def both_ran_again() -> bool:
            return calls["flaky"] >= 4 and calls["hung"] >= 2

        await eventually(both_ran_again)
    finally:
        await scheduler.stop()
        await task
    statuses = {s["name"]: s for s in await read_job_statuses(redis_store)}
    flaky_status = statuses["flaky"]
    assert flaky_status["ok"] is True
    assert flaky_status["failures"] == 2
    assert flaky_status["runs"] >= 4
    assert flaky_status["last_error"] == "RuntimeError: database away (call 2)"
    assert flaky_status["result"]["call"] >= 3
    hung_status = statuses["hung"]
    assert hung_status["ok"] is False and hung_status["error"] == "timed out after 0.1s"
    assert hung_status["failures"] == hung_status["runs"] >= 2
    after = metrics.REGISTRY.get_sample_value("kefu_job_failures_total", {"job": "flaky"})
    assert after == before + 2


async def test_kefu_jobs_shows_the_last_runs_from_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # `kefu jobs` reads the deployment's store (prefix kefu:), here on a database of its own.
    url = "redis://127.0.0.1:6379/14"
    store = RedisStore(url=url)

    async def prune() -> JobResult:
        return {"pruned": 3, "keys_deleted": 12}

    async def purge() -> JobResult:
        raise RuntimeError("audit table locked")

    scheduler = Scheduler(
        store=store,
        jobs=[Job("prune_sessions", prune, 300.0, "prune"), Job("purge_audit", purge, 3600.0, "purge")],
        identity="web-1",
        **FAST,
    )
    task = asyncio.create_task(scheduler.run())
    try:

        async def both_recorded() -> bool:
            statuses = await read_job_statuses(store)
            return len(statuses) == 2 and all(s.get("runs") for s in statuses)

        await eventually(both_recorded)
        monkeypatch.setenv("KEFU_REDIS_URL", url)
        result = await asyncio.to_thread(CliRunner().invoke, jobs_app, [])
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert lines[0] == "leader: web-1"
        prune_line = next(line for line in lines if line.startswith("prune_sessions"))
        assert "5m" in prune_line and " ok in " in prune_line and "pruned=3 keys_deleted=12" in prune_line
        purge_line = next(line for line in lines if line.startswith("purge_audit"))
        assert "FAILED" in purge_line and "RuntimeError: audit table locked" in purge_line

        as_json = await asyncio.to_thread(CliRunner().invoke, jobs_app, ["--json"])
        data = json.loads(as_json.output)
        assert data["leader"] == "web-1"
        assert [job["name"] for job in data["jobs"]] == ["prune_sessions", "purge_audit"]
        assert data["jobs"][1]["failures"] == 1
    finally:
        await scheduler.stop()
        await task
        await drop_keys(store.client, "kefu:scheduler:")
        await store.aclose()


def test_kefu_jobs_without_redis_points_to_metrics() -> None:
    result = CliRunner().invoke(jobs_app, [])
    assert result.exit_code == 0
    assert "KEFU_REDIS_URL is not set" in result.output and "/metrics" in result.output
