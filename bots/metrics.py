"""``GET /metrics``: kefu's Prometheus metrics in the text exposition format.

Before rendering, the values that live elsewhere are sampled: the inbox depth (one cheap call) and the
scheduled jobs' last runs with the dead-letter count they found (from the shared store, so every process
shows the same values). A sample that fails or takes longer than ``SAMPLE_TIMEOUT`` seconds is skipped
and the previous value is served: a slow Redis never makes the scrape itself fail.

With ``KEFU_METRICS_TOKEN`` set, the scrape must send ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from core import metrics
from core.runtime import Runtime
from core.scheduler import read_job_statuses

log = logging.getLogger(__name__)

SAMPLE_TIMEOUT = 2.0


async def sample(runtime: Runtime) -> None:
    """Refresh the gauges read at scrape time from ``runtime``'s inbox and shared store."""
    try:
        async with asyncio.timeout(SAMPLE_TIMEOUT):
            metrics.observe_inbox(depth=await runtime.inbox.depth())
    except Exception:
        log.warning("metrics: could not read the inbox depth", exc_info=True)
    try:
        async with asyncio.timeout(SAMPLE_TIMEOUT):
            statuses = await read_job_statuses(runtime.store)
    except Exception:
        log.warning("metrics: could not read the job statuses", exc_info=True)
        return
    metrics.observe_job_statuses(statuses)
    for status in statuses:
        result = status.get("result")
        if status.get("name") == "inbox_stats" and isinstance(result, dict):
            dead = result.get("dead_letters")
            if isinstance(dead, int):
                metrics.observe_inbox(dead_letters=dead)


def _authorized(request: Request, runtime: Runtime) -> bool:
    token = runtime.settings.metrics_token
    if token is None:
        return True
    sent = request.headers.get("authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    return hmac.compare_digest(sent.encode(), expected.encode())


async def metrics_endpoint(request: Request) -> Response:
    """The exposition of :data:`core.metrics.REGISTRY`."""
    runtime: Runtime = request.app.state.runtime
    if not _authorized(request, runtime):
        return JSONResponse(
            {"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
    await sample(runtime)
    body = await asyncio.to_thread(generate_latest, metrics.REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


routes: list[BaseRoute] = [Route("/metrics", metrics_endpoint, methods=["GET"])]
