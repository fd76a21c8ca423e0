"""The ``kefu`` command: the only place that reads the configuration.

    kefu serve [--host H] [--port P]   gateway (web chat, webhooks, health) on one port
    kefu chat [--session NAME]         talk to the bot in the terminal (or pipe lines in)
    kefu db upgrade                    create or migrate the database schema
    kefu seed-demo                     add demo customers, orders and FAQ (idempotent)
    kefu check                         what is configured and whether it answers

Exit codes: 0 success, 1 something required is down or failed, 2 invalid configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from bots.audit_cli import audit_app
from bots.cli_support import EXIT_CONFIG, EXIT_FAILED, fail, run, settings_of
from bots.faq_cli import faq_app
from bots.jobs_cli import jobs_app
from bots.logs import setup_logging
from core.errors import ConfigError, KefuError
from core.settings import Settings, load_settings

log = logging.getLogger("kefu")

app = typer.Typer(
    name="kefu",
    help="kefu customer-service bot: gateway, terminal chat and operator commands.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(faq_app, name="faq")
app.add_typer(audit_app, name="audit")
app.add_typer(jobs_app, name="jobs")


@app.callback()
def _main(ctx: typer.Context) -> None:
    """Read the settings once, set up logging, and hand the settings to the command."""
    if ctx.resilient_parsing:  # shell completion: no side effects
        return
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
    level = settings.log_level
    if ctx.invoked_subcommand == "chat" and "log_level" not in settings.model_fields_set:
        # The chat shares the terminal with its logs: only problems unless asked for more.
        level = "WARNING"
    setup_logging(level=level, fmt=settings.log_format)
    ctx.obj = settings


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Run the gateway: web chat on /, WebSocket /ws, /healthz, /readyz (and the platform webhooks)."""
    import uvicorn

    from bots.gateway import create_app

    settings = settings_of(ctx)
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,  # keep the logging set up above (JSON or console)
        ws_max_size=1024 * 1024,  # frames above 64 KB get an error frame; far above that, a close
        timeout_graceful_shutdown=30,
        proxy_headers=True,
        server_header=False,
    )
    server = _server_class()(config)
    log.info("serving on http://%s:%d/", host, port)
    try:
        server.run()
    except ConfigError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
    if not server.started:
        # uvicorn has logged why the start-up (database, model...) failed.
        raise fail("the gateway did not start", EXIT_FAILED)


@app.command()
def worker(ctx: typer.Context) -> None:
    """Answer messages from the shared inbox and deliver the replies (no HTTP); run several to scale."""
    settings = settings_of(ctx)
    if settings.redis_url is None:
        raise fail(
            "kefu worker needs KEFU_REDIS_URL: without Redis the inbox lives inside kefu serve", EXIT_CONFIG
        )
    run(_work(settings))


async def _work(settings: Settings) -> None:
    from bots import platforms
    from core.runtime import Runtime

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Runtime.open(settings) as runtime, platforms.running(settings, runtime, receivers=False):
        log.info("worker %s answering from the inbox", platforms.consumer_name())
        await stop.wait()
        log.info("worker stopping: finishing the answers in progress")


def _status(text: str) -> contextlib.AbstractContextManager[Any]:
    """A spinner on the terminal while a long step runs (nothing when stderr is not a terminal)."""
    from rich.console import Console

    console = Console(stderr=True)
    return console.status(text) if console.is_terminal else contextlib.nullcontext()


def _server_class() -> type[Any]:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, ending with exit code 0 after a graceful SIGTERM/SIGINT shutdown.

        uvicorn re-raises the signal once it has shut down, so the process dies "killed by SIGTERM";
        for kefu a requested, completed shutdown is a success (supervisors and scripts see 0).
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    return Server


@app.command()
def chat(
    ctx: typer.Context,
    session: Annotated[
        str | None,
        typer.Option(help="Conversation name (default: your OS user name); the history is kept per name."),
    ] = None,
) -> None:
    """Chat with the bot in this terminal; with a pipe, one message per line and one answer per line."""
    from bots.terminal import chat_until_done, valid_session

    if session is not None and not valid_session(session):
        raise fail("--session must be 1-64 characters of A-Z a-z 0-9 _ . @ -", EXIT_CONFIG)
    try:
        chat_until_done(settings_of(ctx), session=session)
    except ConfigError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
    except KefuError as exc:
        raise fail(str(exc), EXIT_FAILED) from None
    except KeyboardInterrupt:  # before the chat's own Ctrl-C handling is in place
        raise typer.Exit(0) from None


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create the database or migrate it to the schema this version needs."""
    from core.db.database import Database
    from core.db.migrate import head_revision, upgrade

    settings = settings_of(ctx)
    safe_url = Database(url=settings.database_url).safe_url
    try:
        upgrade(settings.database_url)
    except KefuError as exc:
        raise fail(str(exc), EXIT_FAILED) from None
    typer.echo(f"database {safe_url} is at schema {head_revision()}")


@app.command("seed-demo")
def seed_demo(ctx: typer.Context) -> None:
    """Add the demo customers, orders and FAQ entries that are missing (safe to run again)."""
    settings = settings_of(ctx)
    with _status("migrating the database and adding the demo data…"):
        counts = run(_seed(settings))
    added = sum(counts.values())
    for name, count in counts.items():
        typer.echo(f"{name}: {count} added")
    if not added:
        typer.echo("demo data already present")


async def _seed(settings: Settings) -> dict[str, int]:
    from core.db.database import Database
    from core.db.migrate import upgrade_async
    from core.demo import seed_demo as seed

    await upgrade_async(settings.database_url)
    async with Database(url=settings.database_url) as db:
        return await seed(db)


@app.command()
def check(ctx: typer.Context) -> None:
    """Show which platforms are on and whether database, Redis and model answer (exit 1 if not)."""
    from bots.doctor import run_checks

    settings = settings_of(ctx)
    with _status("checking the database, Redis and the model…"):
        findings = run(run_checks(settings))
    typer.echo("kefu check")
    for finding in findings:
        typer.echo(finding.render())
    failed = [f.name for f in findings if f.status == "fail"]
    if failed:
        raise fail("not ready: " + ", ".join(dict.fromkeys(failed)), EXIT_FAILED)
    typer.echo("ready")


def main() -> None:
    """Console-script entry point."""
    # Chinese answers on a terminal or pipe whose encoding is not UTF-8 must not crash the output.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")
    app()


if __name__ == "__main__":
    main()
