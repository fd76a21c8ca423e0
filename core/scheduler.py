"""Scheduled jobs, run by exactly one process of a deployment.

Every ``kefu serve`` process runs a :class:`Scheduler`; they elect a leader through the shared store's
lock ``scheduler:leader`` (taken with ``wait=0``, renewed every ``lock_ttl / 3`` s while held). Only the
leader starts an APScheduler 3 ``AsyncIOScheduler`` (in-memory job store: a job store is never shared,
and the schedule is rebuilt from code by whichever process leads). Followers try again every
``retry_interval`` seconds, so when the leader dies its lock expires after at most ``lock_ttl`` seconds
and another process takes over. A leader that can no longer confirm it holds the lock (renewal failed,
the store unreachable for most of a TTL) stops its scheduler at once, so two leaders never overlap for
longer than the TTL.

Each run is contained: an exception or a run longer than the job's timeout is logged, counted
(``kefu_job_failures_total``) and recorded, and the next run happens on schedule. Runs are coalesced,
at most one instance of a job runs at a time, and a run later than ``misfire_grace_time`` is skipped
(counted as missed). The outcome of every run is written to the shared store (``scheduler:job:<name>``),
so ``kefu jobs`` and ``/metrics`` of any process show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from core import metrics
from core.errors import LockError, StoreError
from core.stores.base import StateStore, StoreLock

__all__ = ["LEADER_LOCK", "Job", "JobResult", "Scheduler", "read_job_statuses", "read_leader"]

log = logging.getLogger(__name__)

JobResult = dict[str, Any]

LEADER_LOCK = "scheduler:leader"
LEADER_INFO = "scheduler:leader-info"
JOBS_INDEX = "scheduler:jobs"
STATUS_PREFIX = "scheduler:job:"
STATUS_TTL = 30 * 24 * 3600.0
"""Job statuses outlive any sensible interval, and disappear a month after a job is removed."""


@dataclass(frozen=True)
class Job:
    """A job the scheduler runs every ``interval`` seconds (and once when its process becomes leader)."""

    name: str
    run: Callable[[], Awaitable[JobResult]]
    interval: float
    description: str
    timeout: float | None = None
    """Seconds one run may take before it is cancelled and counted as failed (None = the interval,
    at least 60 s), so a hung run cannot hold back all later ones."""
    run_at_start: bool = True
    """Run as soon as this process becomes leader: a leader replaced more often than the interval
    (rolling deploys) would otherwise never run the job."""

    @property
    def run_timeout(self) -> float:
        return self.timeout if self.timeout is not None else max(self.interval, 60.0)


def default_identity() -> str:
    """``host-pid``: names the leader in ``kefu jobs`` and the logs."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Scheduler:
    """Leader election plus an APScheduler running ``jobs`` while this process leads.

    ``await scheduler.run()`` campaigns and leads until :meth:`stop`; run it as a task.
    """

    def __init__(
        self,
        *,
        store: StateStore,
        jobs: Sequence[Job],
        identity: str | None = None,
        lock_ttl: float = 15.0,
        retry_interval: float = 5.0,
        misfire_grace_time: float = 60.0,
        stop_grace: float = 10.0,
    ) -> None:
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"job names must be unique: {names}")
        self._store = store
        self._jobs = list(jobs)
        self.identity = identity or default_identity()
        self._lock_ttl = lock_ttl
        self._retry_interval = retry_interval
        self._misfire_grace = misfire_grace_time
        self._stop_grace = stop_grace
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()
        self._finished.set()
        self._running: set[asyncio.Task[Any]] = set()
        self.is_leader = False
        self.terms = 0
        """How often this process became leader."""

    @property
    def jobs(self) -> list[Job]:
        return list(self._jobs)

    async def run(self) -> None:
        """Campaign for leadership and run the jobs while leading, until :meth:`stop` is called."""
        self._finished.clear()
        try:
            while not self._stopping.is_set():
                try:
                    async with self._store.lock(LEADER_LOCK, ttl=self._lock_ttl, wait=0) as lock:
                        await self._lead(lock)
                except LockError:
                    pass  # another process leads (or our lock was lost): try again later
                except StoreError as exc:
                    log.warning("scheduler election: store unavailable (%s); retrying", exc)
                except Exception:
                    log.error("scheduler failed; retrying", exc_info=True)
                await self._sleep(self._retry_interval)
        finally:
            self._finished.set()

    async def stop(self) -> None:
        """Stop leading (jobs in progress get ``stop_grace`` seconds), release the lock, end :meth:`run`."""
        self._stopping.set()
        await self._finished.wait()

    # --- leading ----------------------------------------------------------------------------------

    async def _lead(self, lock: StoreLock) -> None:
        self.is_leader = True
        self.terms += 1
        metrics.SCHEDULER_LEADER.set(1)
        log.info("scheduler: %s leads; running %d jobs", self.identity, len(self._jobs))
        scheduler = self._build()
        graceful = False
        try:
            await self._announce()
            scheduler.start()
            graceful = await self._hold(lock)
        finally:
            await self._shutdown(scheduler, grace=self._stop_grace if graceful else 0.0)
            self.is_leader = False
            metrics.SCHEDULER_LEADER.set(0)
            with contextlib.suppress(Exception):
                await self._store.delete(LEADER_INFO)
            log.info("scheduler: %s no longer leads", self.identity)

    async def _hold(self, lock: StoreLock) -> bool:
        """Keep leading while the lock is ours; True when stopped on request, False when it was lost."""
        loop = asyncio.get_running_loop()
        check = min(1.0, self._lock_ttl / 5)
        confirmed = loop.time()
        while not await self._sleep(check):
            try:
                owned = await lock.owned()
            except StoreError as exc:
                owned = True
                if loop.time() - confirmed > self._lock_ttl * 0.8:
                    # The lock may have expired meanwhile: step down before another process leads.
                    log.error("scheduler: cannot confirm leadership (%s); stepping down", exc)
                    return False
            else:
                if owned:
                    confirmed = loop.time()
            if lock.lost or not owned:
                log.error("scheduler: leadership lost; stopping the jobs here")
                return False
            with contextlib.suppress(StoreError):
                await self._announce()
        return True

    async def _announce(self) -> None:
        info = {"identity": self.identity, "jobs": [job.name for job in self._jobs]}
        await self._store.set(LEADER_INFO, json.dumps(info), ttl=self._lock_ttl)
        await self._store.set(JOBS_INDEX, json.dumps(info["jobs"]), ttl=STATUS_TTL)

    def _build(self) -> AsyncIOScheduler:
        scheduler = AsyncIOScheduler(
            jobstores={"default": MemoryJobStore()},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": self._misfire_grace},
            timezone=UTC,
        )
        now = datetime.now(UTC)
        for job in self._jobs:
            # Without next_run_time the trigger schedules the first run one interval from now.
            first: dict[str, Any] = {"next_run_time": now} if job.run_at_start else {}
            scheduler.add_job(
                self._run_job,
                trigger=IntervalTrigger(seconds=job.interval, timezone=UTC),
                args=[job],
                id=job.name,
                name=job.name,
                **first,
            )
        scheduler.add_listener(_count_missed, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        return scheduler

    async def _shutdown(self, scheduler: AsyncIOScheduler, *, grace: float) -> None:
        if not scheduler.running:
            return
        scheduler.pause()
        running = {task for task in self._running if not task.done()}
        if running and grace > 0:
            await asyncio.wait(running, timeout=grace)
        scheduler.shutdown(wait=False)  # cancels runs still going
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.wait(set(self._running), timeout=5.0)
        # AsyncIOScheduler.shutdown is applied on the next turn of the loop.
        await asyncio.sleep(0)

    async def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` or until stopped; True when stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        return self._stopping.is_set()

    # --- one run ------------------------------------------------------------------------------------

    async def _run_job(self, job: Job) -> None:
        """Run ``job`` once, contained: nothing it raises reaches APScheduler or stops later runs."""
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        started = time.time()
        clock = time.perf_counter()
        result: JobResult | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(job.run_timeout):
                result = await job.run()
        except TimeoutError:
            error = f"timed out after {job.run_timeout:g}s"
            log.error("job %s %s", job.name, error)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("job %s failed", job.name, exc_info=True)
        finally:
            if task is not None:
                self._running.discard(task)
        duration = time.perf_counter() - clock
        metrics.JOB_RUNS.labels(job=job.name).inc()
        metrics.JOB_DURATION.labels(job=job.name).observe(duration)
        if error is not None:
            metrics.JOB_FAILURES.labels(job=job.name).inc()
        else:
            log.debug("job %s done in %.3fs: %s", job.name, duration, result)
        try:
            await self._record(job, started=started, duration=duration, result=result, error=error)
        except Exception:
            log.warning("could not record the outcome of job %s", job.name, exc_info=True)

    async def _record(
        self, job: Job, *, started: float, duration: float, result: JobResult | None, error: str | None
    ) -> None:
        key = STATUS_PREFIX + job.name
        previous = _loads(await self._store.get(key)) or {}
        finished = time.time()
        status = {
            "name": job.name,
            "description": job.description,
            "interval": job.interval,
            "started_at": started,
            "finished_at": finished,
            "duration_seconds": round(duration, 4),
            "ok": error is None,
            "result": result,
            "error": error,
            "runs": int(previous.get("runs", 0)) + 1,
            "failures": int(previous.get("failures", 0)) + (error is not None),
            "last_success_at": finished if error is None else previous.get("last_success_at"),
            "last_error": error or previous.get("last_error"),
            "leader": self.identity,
        }
        await self._store.set(key, json.dumps(status, default=str), ttl=STATUS_TTL)


def _count_missed(event: JobEvent) -> None:
    metrics.JOB_MISSED.labels(job=event.job_id).inc()
    log.warning("job %s skipped a run (late, or the previous run is still going)", event.job_id)


def _loads(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def read_job_statuses(store: StateStore) -> list[dict[str, Any]]:
    """The last recorded run of every job the current (or last) leader runs, in its order."""
    names = json.loads(await store.get(JOBS_INDEX) or "[]")
    statuses = []
    for name in names:
        status = _loads(await store.get(STATUS_PREFIX + str(name)))
        statuses.append(status if status is not None else {"name": name, "runs": 0})
    return statuses


async def read_leader(store: StateStore) -> str | None:
    """Identity of the process leading right now, or None."""
    info = _loads(await store.get(LEADER_INFO))
    return str(info["identity"]) if info and "identity" in info else None
