"""The audit log: append-only, encrypted at rest, hash-chained, purged after the retention period.

Every record's data is JSON encrypted with AES-GCM under the key ring's active key (the key id is kept
per record, so rotated keys still read old records). Each record stores ``prev_hash`` (the hash of the
record before it) and ``hash``, a SHA-256 over its own fields including the ciphertext. The ciphertext's
associated data binds the record's id, time, kind, conversation, actor and ``prev_hash``, so even a
writer who recomputes the hashes after deleting or editing a record is caught: without the key the
payloads no longer authenticate.

Appends are serialised (an asyncio lock in the process; across processes PostgreSQL's
``pg_advisory_xact_lock`` or SQLite's write lock taken by ``BEGIN IMMEDIATE``) and each record's id is
the previous id + 1, so the chain stays one straight line with any number of writers.

Purging removes the oldest records and leaves an *anchor* row in place of the last one removed: it
carries that record's id and hash (so the next record still links to it), and its encrypted payload
repeats both, so only a key holder can make one. :meth:`AuditLog.verify` starts from the anchor.

What a hash chain cannot show by itself: records cut from the *end*. ``verify`` reports the head (last
id and hash); an operator who notes it can later check the log still reaches it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import col

from core.crypto import KeyRing, key_id_of
from core.db.database import Database, retrying
from core.db.models import AuditRecord, utcnow
from core.errors import CryptoError, DatabaseError

log = logging.getLogger(__name__)

T = TypeVar("T")

GENESIS_HASH = "0" * 64
"""``prev_hash`` of the very first record."""
ANCHOR = "anchor"
"""Kind of the row that stands in for purged records."""
AUDIT_LOCK_ID = 0x6B65667561756474  # "kefuaudt": the advisory lock every kefu process appends under

KINDS = frozenset(
    {"inbound", "answer", "tool_call", "tool_result", "guard", "admin", "handoff", "delivery", "error"}
)
"""Record kinds kefu writes (others are accepted; these are the ones tools filter on)."""

Problem = Literal["altered", "deleted", "reordered", "unreadable"]

_SCAN_BATCH = 500
_COLUMNS = (
    col(AuditRecord.id),
    col(AuditRecord.created_at),
    col(AuditRecord.kind),
    col(AuditRecord.conversation_id),
    col(AuditRecord.actor),
    col(AuditRecord.key_id),
    col(AuditRecord.payload),
    col(AuditRecord.prev_hash),
    col(AuditRecord.hash),
)


@dataclass(frozen=True)
class _Row:
    id: int
    created_at: datetime
    kind: str
    conversation_id: int | None
    actor: str
    key_id: str
    payload: str
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class AuditEntry:
    """One record to append with :meth:`AuditLog.record_many`."""

    kind: str
    conversation_id: int | None
    actor: str
    data: dict[str, Any]


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`AuditLog.verify` found."""

    ok: bool
    checked: int
    """Records (anchor included) verified before the first problem, or all of them."""
    first_broken_id: int | None = None
    problem: Problem | None = None
    reason: str | None = None
    anchor_id: int | None = None
    """Id of the purge anchor verification started from, if records were purged."""
    head_id: int | None = None
    head_hash: str | None = None
    """Hash of the last record: note it to detect later truncation of the log's end."""

    def render(self) -> str:
        """One line for the terminal."""
        if self.ok:
            start = f" from purge anchor {self.anchor_id}" if self.anchor_id is not None else ""
            head = f"; head {self.head_id} {self.head_hash}" if self.head_id is not None else ""
            return f"audit log OK: {self.checked} records verified{start}{head}"
        return f"audit log BROKEN at record {self.first_broken_id} ({self.problem}): {self.reason}"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _dumps(data: Any) -> bytes:
    # default=str: datetimes, enums and ids in audit data are recorded as text rather than refused.
    return json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str).encode()


def _aad(
    record_id: int, created_at: datetime, kind: str, conversation_id: int | None, actor: str, prev: str
) -> bytes:
    return json.dumps(
        ["kefu-audit-v1", record_id, _iso(created_at), kind, conversation_id, actor, prev],
        separators=(",", ":"),
    ).encode()


def record_hash(
    *,
    created_at: datetime,
    kind: str,
    conversation_id: int | None,
    actor: str,
    key_id: str,
    payload: str,
    prev_hash: str,
) -> str:
    """SHA-256 (hex) over a record's canonical fields; the id is left out so that a moved record
    still hashes the same and verification can say it was *reordered*."""
    canonical = json.dumps(
        ["kefu-audit-v1", _iso(created_at), kind, conversation_id, actor, key_id, payload, prev_hash],
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class AuditLog:
    """Append, verify, export and purge the encrypted, hash-chained audit log."""

    def __init__(self, *, db: Database, keyring: KeyRing) -> None:
        self._db = db
        self._keyring = keyring
        # Writers in this process queue here instead of all contending for the database lock.
        self._lock = asyncio.Lock()

    # --- writing --------------------------------------------------------------------------------

    async def record(
        self, kind: str, *, conversation_id: int | None, actor: str, data: dict[str, Any]
    ) -> None:
        """Append one record. ``data`` is any JSON-able dict; it is stored encrypted.

        Raises :class:`~core.errors.DatabaseError` when the database fails (after retries for a
        briefly unreachable one).
        """
        await self.record_many([AuditEntry(kind, conversation_id=conversation_id, actor=actor, data=data)])

    async def record_many(self, entries: Sequence[AuditEntry]) -> None:
        """Append several records in one transaction (one lock, one commit), in order.

        Cheaper than :meth:`record` per entry when a turn produces several at once (tool call,
        tool result, guard decision, answer); all of them are stored or none.
        """
        if not entries:
            return
        for entry in entries:
            if not entry.kind or len(entry.kind) > 32 or entry.kind == ANCHOR:
                raise ValueError(f"invalid audit record kind {entry.kind!r}")
        prepared = [(e.kind, e.conversation_id, e.actor[:128], _dumps(e.data)) for e in entries]
        async with self._lock:
            await self._guard(retrying(lambda: self._append(prepared)))

    async def _append(self, entries: list[tuple[str, int | None, str, bytes]]) -> None:
        async with self._db.engine.connect() as conn:
            await self._lock_chain(conn)
            last = (
                await conn.execute(
                    select(col(AuditRecord.id), col(AuditRecord.hash))
                    .order_by(col(AuditRecord.id).desc())
                    .limit(1)
                )
            ).first()
            record_id, prev = (last.id + 1, last.hash) if last is not None else (1, GENESIS_HASH)
            rows = []
            for kind, conversation_id, actor, plaintext in entries:
                values = self._seal(record_id, kind, conversation_id, actor, plaintext, prev_hash=prev)
                rows.append(values)
                record_id, prev = record_id + 1, values["hash"]
            await conn.execute(insert(AuditRecord), rows)
            await conn.commit()

    def _seal(
        self,
        record_id: int,
        kind: str,
        conversation_id: int | None,
        actor: str,
        plaintext: bytes,
        *,
        prev_hash: str,
        inherited_hash: str | None = None,
    ) -> dict[str, Any]:
        created_at = utcnow()
        payload = self._keyring.encrypt(
            plaintext, _aad(record_id, created_at, kind, conversation_id, actor, prev_hash)
        )
        fields: dict[str, Any] = {
            "created_at": created_at,
            "kind": kind,
            "conversation_id": conversation_id,
            "actor": actor,
            "key_id": self._keyring.active_key_id,
            "payload": payload,
            "prev_hash": prev_hash,
        }
        return {"id": record_id, **fields, "hash": inherited_hash or record_hash(**fields)}

    async def _lock_chain(self, conn: AsyncConnection) -> None:
        """Take the database-wide append lock for the rest of ``conn``'s transaction."""
        if self._db.backend == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": AUDIT_LOCK_ID})
        elif self._db.backend == "sqlite":
            # pysqlite would only BEGIN (deferred) at the INSERT, after we read the last record;
            # IMMEDIATE takes the write lock first, so another process cannot append in between.
            await conn.exec_driver_sql("BEGIN IMMEDIATE")

    # --- purging --------------------------------------------------------------------------------

    async def purge(self, older_than: datetime) -> int:
        """Delete records created before ``older_than``; returns how many. The chain stays verifiable:
        an anchor row takes the place of the newest record removed."""
        async with self._lock:
            return await self._guard(retrying(lambda: self._purge(older_than)))

    async def purge_expired(self, *, retention_days: int, now: datetime | None = None) -> int:
        """The scheduled job: purge records older than ``retention_days`` (``KEFU_AUDIT_RETENTION_DAYS``)."""
        cutoff = (now or utcnow()) - timedelta(days=retention_days)
        purged = await self.purge(cutoff)
        if purged:
            log.info("purged %d audit records older than %s", purged, _iso(cutoff))
        return purged

    async def _purge(self, older_than: datetime) -> int:
        async with self._db.engine.connect() as conn:
            await self._lock_chain(conn)
            upto = (
                await conn.execute(
                    select(func.max(col(AuditRecord.id))).where(
                        col(AuditRecord.created_at) < older_than, col(AuditRecord.kind) != ANCHOR
                    )
                )
            ).scalar()
            if upto is None:
                await conn.commit()
                return 0
            # Ids are consecutive, so everything up to ``upto`` goes: the rest stays one chain.
            last = (await conn.execute(select(*_COLUMNS).where(col(AuditRecord.id) == upto))).one()
            count = (
                await conn.execute(
                    select(func.count())
                    .select_from(AuditRecord)
                    .where(col(AuditRecord.id) <= upto, col(AuditRecord.kind) != ANCHOR)
                )
            ).scalar_one()
            await conn.execute(delete(AuditRecord).where(col(AuditRecord.id) <= upto))
            anchor = {
                "purged_upto": upto,
                "last_hash": last.hash,
                "purged": count,
                "older_than": _iso(older_than),
            }
            values = self._seal(
                upto,
                ANCHOR,
                None,
                "system:retention",
                _dumps(anchor),
                prev_hash=last.prev_hash,
                inherited_hash=last.hash,
            )
            await conn.execute(insert(AuditRecord).values(**values))
            await conn.commit()
            return int(count)

    # --- reading --------------------------------------------------------------------------------

    async def verify(self) -> VerifyReport:
        """Walk the whole chain (in batches) and report the first deleted, altered or reordered record.

        Every payload is decrypted too, so a record whose key is no longer in the key ring is reported
        (``unreadable``): keep retired keys until their records are purged.
        """
        return await self._guard(self._verify())

    async def _verify(self) -> VerifyReport:
        async with self._snapshot() as conn:
            return await self._verify_on(conn)

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[AsyncConnection]:
        """A connection whose reads all see one state of the table, so a purge or append running
        while a long verification reads its batches cannot look like tampering."""
        async with self._db.engine.connect() as conn:
            if self._db.backend == "postgresql":
                conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            elif self._db.backend == "sqlite":
                # pysqlite runs SELECTs outside a transaction; a read transaction pins the WAL snapshot.
                await conn.exec_driver_sql("BEGIN")
            try:
                yield conn
            finally:
                await conn.rollback()

    async def _verify_on(self, conn: AsyncConnection) -> VerifyReport:
        checked = 0
        anchor_id: int | None = None
        prev: _Row | None = None
        async for row in self._scan(conn):
            # Order matters for the diagnosis: contents first, then the link (a moved record has
            # intact contents but the wrong neighbour), then the payload's authentication.
            problem = self._check(row, prev)
            if problem is None and prev is not None and row.prev_hash != prev.hash:
                problem = await self._link_problem(conn, row, prev)
            if problem is None and row.kind != ANCHOR:
                problem = self._check_payload(row)
            if problem is not None:
                kind, reason = problem
                return VerifyReport(
                    ok=False,
                    checked=checked,
                    first_broken_id=row.id,
                    problem=kind,
                    reason=reason,
                    anchor_id=anchor_id,
                )
            if prev is None and row.kind == ANCHOR:
                anchor_id = row.id
            checked += 1
            prev = row
        return VerifyReport(
            ok=True,
            checked=checked,
            anchor_id=anchor_id,
            head_id=prev.id if prev else None,
            head_hash=prev.hash if prev else None,
        )

    def _check(self, row: _Row, prev: _Row | None) -> tuple[Problem, str] | None:
        """Problems visible in the row's fields (and, for the first row, where the chain starts)."""
        if row.kind == ANCHOR:
            aad = _aad(row.id, row.created_at, row.kind, row.conversation_id, row.actor, row.prev_hash)
            if prev is not None:
                return "altered", "a purge anchor in the middle of the chain"
            try:
                anchor = json.loads(self._keyring.decrypt(row.payload, aad))
            except CryptoError as exc:
                return self._crypto_problem(row, exc)
            if (
                not isinstance(anchor, dict)
                or anchor.get("purged_upto") != row.id
                or anchor.get("last_hash") != row.hash
            ):
                return "altered", "the purge anchor does not match the records it replaced"
            return None
        expected = record_hash(
            created_at=row.created_at,
            kind=row.kind,
            conversation_id=row.conversation_id,
            actor=row.actor,
            key_id=row.key_id,
            payload=row.payload,
            prev_hash=row.prev_hash,
        )
        if expected != row.hash:
            return "altered", "the record's contents do not match its hash"
        if prev is None and (row.id != 1 or row.prev_hash != GENESIS_HASH):
            return "deleted", f"records before {row.id} are missing and no purge anchor stands in for them"
        return None

    def _check_payload(self, row: _Row) -> tuple[Problem, str] | None:
        """Whether the payload decrypts with the record's own metadata as associated data."""
        aad = _aad(row.id, row.created_at, row.kind, row.conversation_id, row.actor, row.prev_hash)
        try:
            if key_id_of(row.payload) != row.key_id:
                return "altered", "the key id column does not match the payload"
            self._keyring.decrypt(row.payload, aad)
        except CryptoError as exc:
            return self._crypto_problem(row, exc)
        return None

    def _crypto_problem(self, row: _Row, exc: CryptoError) -> tuple[Problem, str]:
        if row.key_id not in self._keyring.key_ids:
            return "unreadable", f"key {row.key_id!r} is not in the key ring (KEFU_AUDIT_KEY): {exc}"
        return "altered", f"the payload does not authenticate (ciphertext or metadata changed): {exc}"

    @staticmethod
    async def _link_problem(conn: AsyncConnection, row: _Row, prev: _Row) -> tuple[Problem, str]:
        if row.id != prev.id + 1:
            return "deleted", f"record(s) {prev.id + 1}..{row.id - 1} are missing"
        elsewhere = (
            await conn.execute(
                select(col(AuditRecord.id)).where(col(AuditRecord.hash) == row.prev_hash).limit(1)
            )
        ).scalar()
        if elsewhere is not None:
            return "reordered", f"the record links to record {elsewhere}, not to record {prev.id} before it"
        return "deleted", f"the record before {row.id} was deleted or replaced (its link does not match)"

    @staticmethod
    async def _scan(conn: AsyncConnection, *, conversation_id: int | None = None) -> AsyncIterator[_Row]:
        """Rows in id order, read in batches so a long log never sits in memory at once."""
        after = 0
        while True:
            query = select(*_COLUMNS).where(col(AuditRecord.id) > after)
            if conversation_id is not None:
                query = query.where(col(AuditRecord.conversation_id) == conversation_id)
            batch = (await conn.execute(query.order_by(col(AuditRecord.id)).limit(_SCAN_BATCH))).all()
            for found in batch:
                yield _Row(*found)
            if len(batch) < _SCAN_BATCH:
                return
            after = batch[-1].id

    async def export(self, conversation_id: int) -> list[dict[str, Any]]:
        """Every record of one conversation, decrypted, oldest first (for an authorised operator).

        Raises :class:`~core.errors.CryptoError` when a record cannot be decrypted (unknown key or altered).
        """
        return await self._guard(self._export(conversation_id))

    async def _export(self, conversation_id: int) -> list[dict[str, Any]]:
        records = []
        async with self._snapshot() as conn:
            rows = [row async for row in self._scan(conn, conversation_id=conversation_id)]
        for row in rows:
            aad = _aad(row.id, row.created_at, row.kind, row.conversation_id, row.actor, row.prev_hash)
            try:
                data = json.loads(self._keyring.decrypt(row.payload, aad))
            except CryptoError as exc:
                raise CryptoError(f"audit record {row.id}: {exc}") from exc
            records.append(
                {
                    "id": row.id,
                    "created_at": _iso(row.created_at),
                    "kind": row.kind,
                    "conversation_id": row.conversation_id,
                    "actor": row.actor,
                    "key_id": row.key_id,
                    "data": data,
                }
            )
        return records

    @staticmethod
    async def _guard(work: Awaitable[T]) -> T:
        """Await ``work``, mapping SQLAlchemy errors (missing table, bad SQL) to DatabaseError."""
        try:
            return await work
        except SQLAlchemyError as exc:
            raise DatabaseError(f"audit log: {exc}") from exc
