"""Logging for kefu processes: readable lines in a terminal, JSON lines for log collectors.

Records may carry ``conversation`` and ``message_id`` extras (the engine and adapters set them); both
formats show them. Message text is never logged at INFO: customers' words belong in the database (and
the encrypted audit log), not in log files that many people can read.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal, Protocol, TextIO

LogFormat = Literal["auto", "json", "console"]

CONTEXT_FIELDS = ("conversation", "message_id")
"""Record extras carried into every log line when present."""

# Libraries that are chatty at INFO and say nothing an operator needs there.
_QUIET_LOGGERS = (
    "httpx",
    "httpcore",
    "aiosqlite",
    "apscheduler",
    "bm25s",
    "websockets",
    "openai",
    "ollama",
    "alembic.runtime.plugins",
)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL logger: message [conversation=... message_id=...]`` for people."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = [
            f"{name}={getattr(record, name)}"
            for name in CONTEXT_FIELDS
            if getattr(record, name, None) is not None
        ]
        if not context:
            return line
        head, sep, rest = line.partition("\n")  # keep a traceback below the context
        return f"{head} [{' '.join(context)}]{sep}{rest}"


def setup_logging(
    *, level: str = "INFO", fmt: LogFormat = "auto", stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr by default) in the chosen format.

    ``auto`` picks JSON when the stream is not a terminal (containers, systemd, log shippers) and
    readable lines otherwise. Replaces handlers set up before, so calling it twice is harmless.
    """
    out: _Stream = stream if stream is not None else _CurrentStderr()
    if fmt == "auto":
        fmt = "console" if _is_tty(out) else "json"
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # uvicorn's own loggers propagate to the root handler instead of printing in their own format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler


class _Stream(Protocol):
    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...
    def isatty(self) -> bool: ...


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at write time: a live terminal display (``kefu chat``) that redirects
    stderr then prints log lines above the answer being written instead of through it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return _is_tty(sys.stderr)


def _is_tty(stream: _Stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False
