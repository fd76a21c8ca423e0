"""Liveness and readiness probes.

``GET /healthz`` answers 200 while the process can serve HTTP at all (restart me if it does not).
``GET /readyz`` answers 200 only while every dependency (database, shared store, model) answers, and 503
with the per-check result otherwise (send me no traffic for now).
"""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from core.runtime import Runtime

log = logging.getLogger(__name__)

READINESS_TIMEOUT = 10.0
"""Seconds a readiness probe may take before it counts as not ready (probes time out themselves)."""


async def healthz(request: Request) -> JSONResponse:
    """200 while the process is alive."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """200 when database, store and model all answer; 503 with the failing checks otherwise."""
    runtime: Runtime = request.app.state.runtime
    try:
        checks = await asyncio.wait_for(runtime.readiness(), timeout=READINESS_TIMEOUT)
    except TimeoutError:
        log.warning("readiness checks took longer than %gs", READINESS_TIMEOUT)
        return JSONResponse(
            {"status": "unavailable", "checks": {}, "detail": "readiness checks timed out"},
            status_code=503,
        )
    ready = all(checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


routes: list[BaseRoute] = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
