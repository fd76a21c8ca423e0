"""The ASGI gateway: one Starlette app with every HTTP and WebSocket route kefu serves.

Each feature lives in its own module exposing ``routes: list[BaseRoute]``; add the module to
:data:`ROUTE_MODULES` to mount it. The lifespan opens the :class:`~core.runtime.Runtime` (database,
store, model, engine) once and keeps it on ``app.state.runtime`` for the handlers.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from bots import platforms
from core.llm.base import ChatModel
from core.runtime import Runtime
from core.settings import Settings

log = logging.getLogger(__name__)

ROUTE_MODULES: tuple[str, ...] = (
    "bots.health",
    "bots.metrics",
    "bots.webchat",
    "bots.slack",
    "bots.wechat",
    "bots.telegram",
    "bots.admin",
)
"""Modules whose ``routes`` the gateway mounts, in order."""


def collect_routes(modules: tuple[str, ...] = ROUTE_MODULES) -> list[BaseRoute]:
    """Every route of ``modules``."""
    routes: list[BaseRoute] = []
    for name in modules:
        routes.extend(importlib.import_module(name).routes)
    return routes


def create_app(settings: Settings, *, model: ChatModel | None = None) -> Starlette:
    """The gateway app; ``model`` replaces the configured backend (tests, benchmarks)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Runtime.open(settings, model=model) as runtime:
            app.state.runtime = runtime
            app.state.settings = settings
            async with platforms.running(settings, runtime, worker=settings.serve_worker) as senders:
                app.state.senders = senders
                log.info("gateway ready (model backend %s)", runtime.model.name)
                yield
        log.info("gateway stopped")

    return Starlette(routes=collect_routes(), lifespan=lifespan)
