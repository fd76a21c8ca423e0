"""``kefu faq``: import and export the FAQ, review wordings learned from customers and written by the model.

    kefu faq import FILE                        add or update entries from a .csv, .yaml or .json file
    kefu faq export [FILE] [--format csv|yaml|json]   write every entry (to stdout without FILE)
    kefu faq learned [--all] [--min-picks N]    customers' wordings that led to an entry, for review
    kefu faq accept [ID ...] [--min-picks N]    add them to their entries' alternative phrasings
    kefu faq reject ID ...                      never propose them again
    kefu faq expand [ID ...] [--rewrite] [--limit N]   have the model write customer phrasings
    kefu faq phrasings [ID] [--drop N ...]      list the model's phrasings (of one entry), drop bad ones

An import is all or nothing: a bad row rejects the file, listing each problem with its line number.
With a shared store (``KEFU_REDIS_URL``) the FAQ cache is rebuilt at once; running servers also notice
the change themselves and reload their FAQ index within their refresh interval.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from bots.cli_support import EXIT_CONFIG, EXIT_FAILED, fail, run, settings_of
from core.db.models import FaqEntry
from core.errors import KefuError
from core.faq.learning import LearnedPhrasing, LearnedPhrasings
from core.faq.phrasings import ExpandReport, current_generated
from core.faq.repository import FORMATS, FaqRepository, Format, ImportReport, detect_format
from core.settings import Settings

faq_app = typer.Typer(
    help="FAQ commands: import and export entries, review wordings learned from customers or written by "
    "the model.",
    no_args_is_help=True,
)


@faq_app.command("import")
def import_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="FAQ file.")],
) -> None:
    """Add or update FAQ entries from a CSV (header: question,answer[,language,alternatives,tags]),
    YAML or JSON file. Entries are matched on question and language, so re-importing is safe."""
    settings = settings_of(ctx)
    try:
        report = asyncio.run(_import(settings, file))
    except KefuError as exc:
        typer.echo(f"kefu: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    typer.echo(
        f"{report.total} entries in {file}: {report.created} added, {report.updated} updated, "
        f"{report.unchanged} unchanged"
    )
    if report.ignored_columns:
        typer.echo(f"ignored unknown field(s): {', '.join(report.ignored_columns)}")


async def _import(settings: Settings, file: Path) -> ImportReport:
    from core.db.database import Database
    from core.db.migrate import upgrade_async

    if settings.auto_migrate:
        await upgrade_async(settings.database_url)
    async with Database(url=settings.database_url) as db:
        repository = FaqRepository(db=db)
        with Progress(
            TextColumn("importing"),
            BarColumn(),
            MofNCompleteColumn(),
            transient=True,
            disable=not sys.stderr.isatty(),
            console=None,
        ) as progress:
            task = progress.add_task("import", total=None)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            report = await repository.import_file(file, progress=advance)
        if report.changed and settings.redis_url:
            await _refresh_shared_cache(settings, repository)
    return report


async def _refresh_shared_cache(settings: Settings, repository: FaqRepository) -> None:
    from core.faq.cache import FaqCache
    from core.stores.factory import build_store

    async with build_store(redis_url=settings.redis_url) as store:
        entries = await repository.list(enabled_only=True)
        await FaqCache(store=store).rebuild(entries, fingerprint=await repository.fingerprint())


@faq_app.command("export")
def export_command(
    ctx: typer.Context,
    file: Annotated[
        Path | None, typer.Argument(dir_okay=False, help="Output file (default: stdout).")
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", "-f", help="csv, yaml or json (default: from the file name, else csv)."),
    ] = None,
) -> None:
    """Write every FAQ entry to FILE (or stdout) in a format `kefu faq import` reads back."""
    settings = settings_of(ctx)
    if fmt is not None and fmt not in FORMATS:
        typer.echo(f"kefu: --format must be one of {', '.join(FORMATS)}", err=True)
        raise typer.Exit(EXIT_CONFIG)
    try:
        chosen: Format = fmt if fmt is not None else (detect_format(file) if file else "csv")
        count = asyncio.run(_export(settings, file, chosen))
    except KefuError as exc:
        typer.echo(f"kefu: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    if file is not None:
        typer.echo(f"{count} entries written to {file}")


async def _export(settings: Settings, file: Path | None, fmt: Format) -> int:
    from core.db.database import Database
    from core.db.migrate import upgrade_async

    if settings.auto_migrate:
        await upgrade_async(settings.database_url)
    async with Database(url=settings.database_url) as db:
        return await FaqRepository(db=db).export(file if file is not None else sys.stdout, fmt)


@faq_app.command("learned")
def learned_command(
    ctx: typer.Context,
    every: Annotated[bool, typer.Option("--all", help="Also list accepted and rejected wordings.")] = False,
    min_picks: Annotated[
        int, typer.Option("--min-picks", min=1, help="Only wordings picked this often.")
    ] = 1,
) -> None:
    """List customers' wordings that led to an FAQ entry (they picked it from the fallback's suggestions),
    most picked first: accept them with `kefu faq accept`, or reject them with `kefu faq reject`."""
    settings = settings_of(ctx)
    try:
        rows = asyncio.run(_learned(settings, status=None if every else "pending", min_picks=min_picks))
    except KefuError as exc:
        typer.echo(f"kefu: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    if not rows:
        typer.echo("no learned wordings" if every else "no wordings waiting for review")
        return
    table = Table("id", "picks", "status", "entry", "customer wording", box=None)
    for row in rows:
        table.add_row(
            str(row.id), str(row.picks), row.status, f"{row.entry_id} {row.entry_question}", row.phrasing
        )
    Console(soft_wrap=True).print(table)


@faq_app.command("accept")
def accept_command(
    ctx: typer.Context,
    ids: Annotated[list[int] | None, typer.Argument(help="Ids from `kefu faq learned`.")] = None,
    min_picks: Annotated[
        int | None, typer.Option("--min-picks", min=1, help="Accept every wording picked this often.")
    ] = None,
) -> None:
    """Add learned wordings to their entries' alternative phrasings."""
    settings = settings_of(ctx)
    if not ids and min_picks is None:
        typer.echo("kefu: name the wordings to accept (ids) or give --min-picks", err=True)
        raise typer.Exit(EXIT_CONFIG)
    try:
        accepted = asyncio.run(_decide(settings, accept=True, ids=ids or [], min_picks=min_picks))
    except KefuError as exc:
        typer.echo(f"kefu: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    typer.echo(f"{accepted} wording(s) added to their FAQ entries")


@faq_app.command("reject")
def reject_command(
    ctx: typer.Context,
    ids: Annotated[list[int], typer.Argument(help="Ids from `kefu faq learned`.")],
) -> None:
    """Reject learned wordings: they are not proposed again."""
    settings = settings_of(ctx)
    try:
        rejected = asyncio.run(_decide(settings, accept=False, ids=ids, min_picks=None))
    except KefuError as exc:
        typer.echo(f"kefu: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    typer.echo(f"{rejected} wording(s) rejected")


async def _learned(settings: Settings, *, status: str | None, min_picks: int) -> list[LearnedPhrasing]:
    from core.db.database import Database
    from core.db.migrate import upgrade_async

    if settings.auto_migrate:
        await upgrade_async(settings.database_url)
    async with Database(url=settings.database_url) as db:
        return await LearnedPhrasings(db=db).wordings(status=status, min_picks=min_picks)


async def _decide(settings: Settings, *, accept: bool, ids: list[int], min_picks: int | None) -> int:
    from core.db.database import Database
    from core.db.migrate import upgrade_async

    if settings.auto_migrate:
        await upgrade_async(settings.database_url)
    async with Database(url=settings.database_url) as db:
        learned = LearnedPhrasings(db=db)
        if not accept:
            return await learned.reject(ids)
        accepted = await learned.accept(ids, min_picks=min_picks)
        if accepted and settings.redis_url:
            await _refresh_shared_cache(settings, FaqRepository(db=db))
        return len(accepted)


@faq_app.command("expand")
def expand_command(
    ctx: typer.Context,
    ids: Annotated[list[int] | None, typer.Argument(help="Entry ids (default: every entry).")] = None,
    rewrite: Annotated[
        bool, typer.Option("--rewrite", help="Also entries whose phrasings are current: write them anew.")
    ] = False,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many entries.")] = None,
) -> None:
    """Have the model write KEFU_FAQ_PHRASINGS customer phrasings for FAQ entries that have none for
    their current question and answer. The fallback matches them while the model is down; phrasings
    closer to another entry than to their own are dropped."""
    settings = settings_of(ctx)
    if settings.faq_phrasings == 0:
        raise fail("KEFU_FAQ_PHRASINGS is 0: the model writes no phrasings", EXIT_CONFIG)
    report = run(_expand(settings, ids=ids, rewrite=rewrite, limit=limit))
    typer.echo(
        f"{report.phrasings} phrasing(s) stored for {report.entries} entry(ies)"
        f" ({report.ambiguous} dropped as closer to another entry); {report.waiting} still waiting"
    )
    if report.failed:
        raise fail(
            f"the model could not write phrasings for entry {report.failed[0]}; try again later", EXIT_FAILED
        )


async def _expand(
    settings: Settings, *, ids: list[int] | None, rewrite: bool, limit: int | None
) -> ExpandReport:
    from core.db.database import Database
    from core.db.migrate import upgrade_async
    from core.faq.phrasings import PhrasingWriter, expand_faq
    from core.faq.retriever import DEFAULT_EMBEDDER
    from core.faq.service import RetrieverHolder
    from core.faq.vectors import VectorStore
    from core.llm.factory import build_model

    if settings.auto_migrate:
        await upgrade_async(settings.database_url)
    async with Database(url=settings.database_url) as db, build_model(settings) as model:
        return await expand_faq(
            repository=FaqRepository(db=db),
            writer=PhrasingWriter(model=model, count=settings.faq_phrasings),
            retriever_holder=RetrieverHolder(
                embedder=DEFAULT_EMBEDDER if settings.faq_embeddings else None, vectors=VectorStore(db=db)
            ),
            entry_ids=ids or None,
            limit=limit,
            rewrite=rewrite,
        )


@faq_app.command("phrasings")
def phrasings_command(
    ctx: typer.Context,
    entry_id: Annotated[int | None, typer.Argument(help="One entry (default: all).")] = None,
    drop: Annotated[
        list[int] | None, typer.Option("--drop", help="Drop the entry's phrasing number N (repeatable).")
    ] = None,
) -> None:
    """List the phrasings the model wrote (stale ones, written for an earlier question or answer, are
    not used); with ``--drop`` remove bad ones from one entry."""
    settings = settings_of(ctx)
    if drop and entry_id is None:
        raise fail("--drop needs the entry id", EXIT_CONFIG)
    entries = run(_phrasings(settings, entry_id=entry_id, drop=drop or []))
    rows = [(e, n, text) for e in entries for n, text in enumerate(e.generated, start=1)]
    if drop:
        typer.echo(f"{len(drop)} phrasing(s) dropped from entry {entry_id}")
    if not rows:
        typer.echo("no phrasings written by the model")
        return
    table = Table("entry", "n", "phrasing", "state", box=None)
    for entry, n, text in rows:
        state = "used" if current_generated(entry) else "stale"
        table.add_row(f"{entry.id} {entry.question}", str(n), text, state)
    Console(soft_wrap=True).print(table)


async def _phrasings(settings: Settings, *, entry_id: int | None, drop: list[int]) -> list[FaqEntry]:
    from core.db.database import Database
    from core.db.migrate import upgrade_async

    if settings.auto_migrate:
        await upgrade_async(settings.database_url)
    async with Database(url=settings.database_url) as db:
        repository = FaqRepository(db=db)
        if entry_id is None:
            return await repository.list()
        if drop:
            try:
                return [await repository.drop_generated(entry_id, drop)]
            except KeyError:
                raise KefuError(f"no FAQ entry {entry_id}") from None
            except ValueError as exc:
                raise KefuError(str(exc)) from None
        entry = await repository.get(entry_id)
        if entry is None:
            raise KefuError(f"no FAQ entry {entry_id}")
        return [entry]
