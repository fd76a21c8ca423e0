"""``kefu audit``: operator commands for the encrypted, hash-chained audit log.

    kefu audit verify                      check the whole chain (exit 1 if a record was altered/deleted)
    kefu audit export --conversation ID    print a conversation's records, decrypted, as JSON
    kefu audit purge [--days N]            delete records past retention now (the scheduler does it daily)
    kefu audit keygen [--key-id ID]        print a new key for KEFU_AUDIT_KEY

Reading the log needs the key (``KEFU_AUDIT_KEY``, or the generated ``kefu.key`` of an embedded setup):
whoever holds it is the authorised operator. Every export is itself recorded in the audit log.
Mounted on the main command with ``app.add_typer(audit_app, name="audit")``.
"""

from __future__ import annotations

import asyncio
import getpass
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from bots.cli_support import EXIT_CONFIG, EXIT_FAILED, T, fail, run, settings_of
from core.audit import AuditLog, VerifyReport
from core.crypto import KeyRing, keyring_from_settings
from core.db.database import Database
from core.errors import ConfigError
from core.settings import Settings

audit_app = typer.Typer(
    help="Audit log: verify the hash chain, export a conversation, purge, make keys.",
    no_args_is_help=True,
)


def _operator() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name in a bare container
        return "cli:unknown"


async def _with_log(settings: Settings, work: Callable[[AuditLog], Awaitable[T]]) -> T:
    # Never generate a key here: a new key could not read anything already written.
    keyring = await asyncio.to_thread(keyring_from_settings, settings, create=False)
    async with Database(url=settings.database_url) as db:
        return await work(AuditLog(db=db, keyring=keyring))


@audit_app.command()
def verify(ctx: typer.Context) -> None:
    """Check every record's hash, link and encryption; exit 1 when one was altered, deleted or moved."""

    async def work(log: AuditLog) -> VerifyReport:
        return await log.verify()

    report = run(_with_log(settings_of(ctx), work))
    typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


@audit_app.command()
def export(
    ctx: typer.Context,
    conversation: Annotated[int, typer.Option("--conversation", help="Conversation id.")],
    output: Annotated[Path | None, typer.Option(help="Write the JSON here instead of stdout.")] = None,
) -> None:
    """Print one conversation's audit records, decrypted, as a JSON array (oldest first)."""

    async def work(log: AuditLog) -> list[dict[str, Any]]:
        records = await log.export(conversation)
        # Reading customers' data is itself an admin action worth a record. Written only once the
        # export worked, so a wrong key never adds a record the real key cannot read.
        await log.record(
            "admin",
            conversation_id=None,
            actor=_operator(),
            data={"action": "audit_export", "conversation_id": conversation, "records": len(records)},
        )
        return records

    records = run(_with_log(settings_of(ctx), work))
    text = json.dumps(records, ensure_ascii=False, indent=2)
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n", encoding="utf-8")
        output.chmod(0o600)
        typer.echo(f"{len(records)} records written to {output}", err=True)


@audit_app.command()
def purge(
    ctx: typer.Context,
    days: Annotated[
        int | None, typer.Option(min=1, help="Keep this many days (default KEFU_AUDIT_RETENTION_DAYS).")
    ] = None,
) -> None:
    """Delete records older than the retention period now; the chain stays verifiable."""
    settings = settings_of(ctx)
    retention = days or settings.audit_retention_days

    async def work(log: AuditLog) -> int:
        return await log.purge_expired(retention_days=retention)

    purged = run(_with_log(settings, work))
    typer.echo(f"{purged} audit records older than {retention} days purged")


@audit_app.command()
def keygen(
    key_id: Annotated[
        str | None, typer.Option(help="Key id (A-Z a-z 0-9 _ -); default k<today's date>.")
    ] = None,
) -> None:
    """Print a new key line for KEFU_AUDIT_KEY. To rotate, put it FIRST and keep the old keys after it."""
    key_id = key_id or datetime.now(UTC).strftime("k%Y%m%d")
    line = f"{key_id}:{KeyRing.generate_key()}"
    try:
        KeyRing.from_spec(line)  # validates the id
    except ConfigError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
    typer.echo(line)
