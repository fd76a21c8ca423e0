"""What every ``kefu`` command group shares: exit codes, error messages, settings, running a coroutine.

The root callback (``bots.cli``) reads the settings once and puts them on the context; a sub-app run on
its own (``python -m bots.faq_cli``, tests with CliRunner) reads them here instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import typer

from core.errors import ConfigError, KefuError
from core.settings import Settings, load_settings

log = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_FAILED = 1
"""A command failed or something it needs is down."""
EXIT_CONFIG = 2
"""The configuration is invalid (the message names the KEFU_* variable)."""


def fail(message: str, code: int) -> typer.Exit:
    """Print ``kefu: message`` on stderr; raise the returned Exit."""
    typer.echo(f"kefu: {message}", err=True)
    return typer.Exit(code)


def settings_of(ctx: typer.Context) -> Settings:
    """The settings the root callback read, or read them now."""
    settings = ctx.find_root().obj
    if isinstance(settings, Settings):
        return settings
    try:
        return load_settings()
    except ConfigError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop (as uvicorn runs the gateway) where it is installed; configuration and
    dependency errors become a message and an exit code."""
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(coro)
    except ConfigError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
    except KefuError as exc:
        log.debug("command failed", exc_info=True)
        raise fail(str(exc), EXIT_FAILED) from None


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # uvicorn[standard] installs it everywhere but on Windows
        return None
    return uvloop.new_event_loop
