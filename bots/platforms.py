"""Wiring of the platform integrations into a running gateway.

Each platform module (``bots.telegram``, ``bots.slack``, ``bots.wechat``, ``bots.webchat``) exposes:

- ``routes``: its HTTP/WebSocket routes (mounted always; a disabled platform's routes answer 404),
- ``enabled(settings) -> bool``: whether its credentials are set,
- ``build_sender(settings, runtime) -> ReplySender``: the outbound side, for the worker,
- optionally ``background(settings, runtime) -> list[Coroutine]``: long-running tasks (Telegram
  polling, Slack Socket Mode) started with the gateway and cancelled at shutdown.

``running()`` builds the senders of the enabled platforms, starts the in-process worker, the platforms'
background tasks and the scheduler (``KEFU_SCHEDULER_ENABLED``; one leader runs the jobs), and stops them
in order at shutdown (scheduler, then stop claiming and finish in-flight work).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

from core.delivery import SenderRegistry
from core.heap import settle
from core.jobs import notify_through, standard_jobs
from core.runtime import Runtime
from core.scheduler import Scheduler
from core.settings import Settings
from core.worker import Worker

log = logging.getLogger(__name__)

PLATFORM_MODULES: tuple[str, ...] = ("bots.webchat", "bots.telegram", "bots.slack", "bots.wechat")


def platform_modules() -> list[ModuleType]:
    modules = []
    for name in PLATFORM_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return modules


def build_senders(settings: Settings, runtime: Runtime) -> SenderRegistry:
    senders = SenderRegistry()
    for module in platform_modules():
        if hasattr(module, "build_sender") and module.enabled(settings):
            senders.add(module.build_sender(settings, runtime))
    return senders


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@asynccontextmanager
async def running(
    settings: Settings, runtime: Runtime, *, worker: bool = True, receivers: bool = True
) -> AsyncIterator[SenderRegistry]:
    """Start the worker, the scheduler and (with ``receivers``) the platforms' background tasks
    (pollers, sockets, webhook registration) for the lifetime of the block."""
    senders = build_senders(settings, runtime)
    tasks: list[asyncio.Task[Any]] = []
    the_worker: Worker | None = None
    if worker:
        the_worker = Worker(
            inbox=runtime.inbox,
            engine=runtime.engine,
            senders=senders,
            store=runtime.store,
            consumer=consumer_name(),
            concurrency=settings.worker_concurrency,
        )
        tasks.append(asyncio.create_task(the_worker.run(after=runtime.faq_synced), name="worker"))
    for module in platform_modules() if receivers else ():
        if hasattr(module, "background") and module.enabled(settings):
            coroutines: list[Coroutine[Any, Any, Any]] = module.background(settings, runtime)
            tasks.extend(asyncio.create_task(c, name=f"{module.__name__}") for c in coroutines)
    log.info("platforms on: %s", ", ".join(senders.channels()) or "none")
    scheduler = None
    if settings.scheduler_enabled:
        jobs = standard_jobs(runtime, notify=notify_through(senders))
        scheduler = Scheduler(store=runtime.store, jobs=jobs, identity=consumer_name())
        scheduler_task = asyncio.create_task(scheduler.run(), name="scheduler")
    # The process is started: what it built lives as long as it does, so keep full collections off it.
    settle()
    try:
        yield senders
    finally:
        if scheduler is not None:  # first: its jobs may still send through the platforms
            await scheduler.stop()
            await scheduler_task
        # Finish in-flight answers first, while the platforms' clients are still open.
        if the_worker is not None:
            await the_worker.stop()
            await tasks[0]
        for task in tasks[1 if the_worker else 0 :]:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await senders.aclose()
