"""``kefu jobs``: the scheduled jobs' last runs, read from the shared store (any process can ask).

    kefu jobs           leader, and per job: interval, last run, outcome, what it did, runs/failures
    kefu jobs --json    the same as JSON

Job runs are recorded in the shared store by whichever process leads, so this needs ``KEFU_REDIS_URL``;
without it the jobs run inside the single ``kefu serve`` process and ``GET /metrics`` shows them.
Mounted on the main command with ``app.add_typer(jobs_app, name="jobs")``.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from bots.cli_support import EXIT_FAILED, fail, settings_of
from core.errors import KefuError
from core.scheduler import read_job_statuses, read_leader
from core.settings import Settings
from core.stores.factory import build_store

jobs_app = typer.Typer(
    help="Scheduled jobs: which process leads and how each job's last run went.",
    invoke_without_command=True,
)


async def _read(settings: Settings) -> tuple[str | None, list[dict[str, Any]]]:
    async with build_store(redis_url=settings.redis_url) as store:
        return await read_leader(store), await read_job_statuses(store)


@jobs_app.callback()
def jobs(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show the leader and the last run of every scheduled job."""
    if ctx.invoked_subcommand is not None:
        return
    settings = settings_of(ctx)
    if not settings.redis_url:
        typer.echo(
            "KEFU_REDIS_URL is not set: the jobs run inside the kefu serve process and only its "
            "GET /metrics shows their runs (kefu_job_*)."
        )
        return
    try:
        leader, statuses = asyncio.run(_read(settings))
    except KefuError as exc:
        raise fail(str(exc), EXIT_FAILED) from None
    if as_json:
        typer.echo(json.dumps({"leader": leader, "jobs": statuses}, ensure_ascii=False, indent=2))
        return
    typer.echo(render(leader, statuses))


def render(leader: str | None, statuses: list[dict[str, Any]], *, now: float | None = None) -> str:
    """The ``kefu jobs`` table."""
    lines = [
        f"leader: {leader}" if leader else "leader: none right now (a process takes over within seconds)"
    ]
    if not statuses:
        lines.append("no job has run yet")
        return "\n".join(lines)
    header = ("JOB", "EVERY", "LAST RUN", "OUTCOME", "RUNS", "FAILED", "RESULT")
    rows = [header, *(_row(status, now=now) for status in statuses)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _row(status: dict[str, Any], *, now: float | None) -> tuple[str, ...]:
    name = str(status.get("name", "?"))
    interval = status.get("interval")
    every = _duration(float(interval)) if isinstance(interval, int | float) else "-"
    finished = status.get("finished_at")
    if not isinstance(finished, int | float):
        return (name, every, "never", "-", "0", "0", "")
    moment = datetime.fromtimestamp(finished, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    ago = _duration((now if now is not None else datetime.now(UTC).timestamp()) - finished)
    took = status.get("duration_seconds")
    outcome = "ok" if status.get("ok") else "FAILED"
    if isinstance(took, int | float):
        outcome += f" in {took:.2f}s"
    result = status.get("result")
    if status.get("ok"):
        detail = " ".join(f"{k}={v}" for k, v in result.items()) if isinstance(result, dict) else ""
    else:
        detail = str(status.get("error") or "")
    return (
        name,
        every,
        f"{moment} ({ago} ago)",
        outcome,
        str(status.get("runs", 0)),
        str(status.get("failures", 0)),
        detail,
    )


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
