"""The audit log on SQLite and PostgreSQL: encrypted records, rotation, tamper/deletion/reorder detection,
retention purge with an anchor, concurrent writers, and the ``kefu audit`` commands."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from bots.audit_cli import audit_app
from core.audit import AuditEntry, AuditLog, record_hash
from core.crypto import KeyRing
from core.db.database import Database
from core.db.migrate import upgrade_async
from core.db.models import utcnow
from core.errors import CryptoError

SECRET = "我的银行卡号6222020200112233445"
K1 = KeyRing.generate_key()
K2 = KeyRing.generate_key()
RING1 = KeyRing.from_spec(f"k1:{K1}")
RING2 = KeyRing.from_spec(f"k2:{K2},k1:{K1}")  # k2 rotated in, k1 kept for reading


async def _fill(log: AuditLog, count: int, *, conversation_id: int = 7) -> None:
    for n in range(count):
        await log.record("inbound", conversation_id=conversation_id, actor="customer:alice", data={"n": n})


async def _sql(db: Database, statement: str, **params: Any) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text(statement), params)


async def test_records_export_decrypted_and_verify(database: Database) -> None:
    log = AuditLog(db=database, keyring=RING1)
    await log.record("inbound", conversation_id=7, actor="customer:alice", data={"text": SECRET})
    await log.record("tool_call", conversation_id=7, actor="bot", data={"name": "order_status", "args": {}})
    await log.record("answer", conversation_id=8, actor="bot", data={"text": "other conversation"})

    exported = await log.export(7)

    assert [(r["id"], r["kind"], r["actor"]) for r in exported] == [
        (1, "inbound", "customer:alice"),
        (2, "tool_call", "bot"),
    ]
    assert exported[0]["data"] == {"text": SECRET} and exported[0]["key_id"] == "k1"
    report = await log.verify()
    assert report.ok and report.checked == 3 and report.head_id == 3
    async with database.engine.connect() as conn:
        payloads = (await conn.execute(text("SELECT payload FROM audit_records"))).scalars().all()
    assert all(SECRET not in p and "6222020200112233445" not in p for p in payloads)


async def test_a_turns_records_go_in_together_and_in_order(database: Database) -> None:
    log = AuditLog(db=database, keyring=RING1)
    await log.record("inbound", conversation_id=7, actor="customer:alice", data={"text": "查订单"})
    turn = [
        AuditEntry("tool_call", conversation_id=7, actor="bot", data={"name": "order_status"}),
        AuditEntry("tool_result", conversation_id=7, actor="tool:order_status", data={"ok": True}),
        AuditEntry("answer", conversation_id=7, actor="bot", data={"text": "已发货"}),
    ]
    await log.record_many(turn)
    with pytest.raises(ValueError, match="kind"):
        await log.record_many([*turn, AuditEntry("anchor", conversation_id=7, actor="x", data={})])

    exported = await log.export(7)

    assert [r["kind"] for r in exported] == ["inbound", "tool_call", "tool_result", "answer"]
    assert (await log.verify()).ok


async def test_key_rotation_keeps_old_records_readable(database: Database) -> None:
    await _fill(AuditLog(db=database, keyring=RING1), 2)
    rotated = AuditLog(db=database, keyring=RING2)
    await _fill(rotated, 2)

    exported = await rotated.export(7)

    assert [r["key_id"] for r in exported] == ["k1", "k1", "k2", "k2"]
    assert [r["data"]["n"] for r in exported] == [0, 1, 0, 1]
    assert (await rotated.verify()).ok
    # Dropping k1 from the ring too early: verify says which records it can no longer read.
    report = await AuditLog(db=database, keyring=KeyRing.from_spec(f"k2:{K2}")).verify()
    assert not report.ok and report.problem == "unreadable" and report.first_broken_id == 1
    assert "'k1'" in (report.reason or "")


async def test_altered_ciphertext_byte_is_detected(database: Database) -> None:
    log = AuditLog(db=database, keyring=RING1)
    await _fill(log, 5)
    # One character in the middle of the ciphertext (the 11th from the end) changes.
    await _sql(
        database,
        "UPDATE audit_records SET payload = substr(payload, 1, length(payload) - 11) || "
        "CASE WHEN substr(payload, length(payload) - 10, 1) = 'A' THEN 'B' ELSE 'A' END || "
        "substr(payload, length(payload) - 9) WHERE id = 3",
    )

    report = await log.verify()

    assert not report.ok and report.first_broken_id == 3 and report.problem == "altered"
    assert report.checked == 2
    with pytest.raises(CryptoError, match="audit record 3"):
        await log.export(7)


async def test_deleted_middle_record_is_detected(database: Database) -> None:
    log = AuditLog(db=database, keyring=RING1)
    await _fill(log, 5)
    await _sql(database, "DELETE FROM audit_records WHERE id = 3")

    report = await log.verify()

    assert not report.ok and report.first_broken_id == 4 and report.problem == "deleted"
    assert "3..3" in (report.reason or "")


async def test_deleted_first_record_is_detected(database: Database) -> None:
    log = AuditLog(db=database, keyring=RING1)
    await _fill(log, 3)
    await _sql(database, "DELETE FROM audit_records WHERE id = 1")

    report = await log.verify()

    assert not report.ok and report.first_broken_id == 2 and report.problem == "deleted"


async def test_reordered_records_are_detected(database: Database) -> None:
    log = AuditLog(db=database, keyring=RING1)
    await _fill(log, 5)
    await _sql(database, "UPDATE audit_records SET id = -1 WHERE id = 2")
    await _sql(database, "UPDATE audit_records SET id = 2 WHERE id = 3")
    await _sql(database, "UPDATE audit_records SET id = 3 WHERE id = -1")

    report = await log.verify()

    assert not report.ok and report.first_broken_id == 2 and report.problem == "reordered"


async def test_rewriting_the_hashes_after_a_deletion_is_still_caught(database: Database) -> None:
    # Someone with database access (but not the key) deletes record 3, renumbers the rest and
    # recomputes every hash so the chain links up again: the payloads no longer authenticate.
    log = AuditLog(db=database, keyring=RING1)
    await _fill(log, 5)
    await _sql(database, "DELETE FROM audit_records WHERE id = 3")
    await _sql(database, "UPDATE audit_records SET id = id - 1 WHERE id > 3")
    async with database.engine.begin() as conn:
        rows = (await conn.execute(text("SELECT * FROM audit_records ORDER BY id"))).mappings().all()
        prev = rows[0]["hash"]
        for row in rows[1:]:
            fields = {
                k: row[k] for k in ("created_at", "kind", "conversation_id", "actor", "key_id", "payload")
            }
            if isinstance(fields["created_at"], str):  # SQLite returns text through raw SQL
                fields["created_at"] = datetime.fromisoformat(fields["created_at"]).replace(tzinfo=UTC)
            new_hash = record_hash(**fields, prev_hash=prev)
            await conn.execute(
                text("UPDATE audit_records SET prev_hash = :p, hash = :h WHERE id = :id"),
                {"p": prev, "h": new_hash, "id": row["id"]},
            )
            prev = new_hash

    report = await log.verify()

    assert not report.ok and report.first_broken_id == 3 and report.problem == "altered"


async def test_purge_keeps_the_chain_verifiable_from_an_anchor(database: Database) -> None:
    log = AuditLog(db=database, keyring=RING1)
    await _fill(log, 6)
    old = utcnow() - timedelta(days=40)
    await _sql(database, "UPDATE audit_records SET created_at = :old WHERE id <= 4", old=old)

    purged = await log.purge_expired(retention_days=30)

    assert purged == 4
    report = await log.verify()
    assert report.ok and report.anchor_id == 4 and report.checked == 3  # anchor + records 5 and 6
    assert [r["id"] for r in await log.export(7)] == [5, 6]
    # The chain goes on from there, and a later purge replaces the anchor.
    await _fill(log, 2)
    assert (await log.verify()).ok
    assert await log.purge(utcnow() + timedelta(seconds=1)) == 4
    report = await log.verify()
    assert report.ok and report.anchor_id == 8 and report.checked == 1
    await _fill(log, 1)
    report = await log.verify()
    assert report.ok and report.head_id == 9
    assert await log.purge_expired(retention_days=30) == 0


async def test_deleting_or_forging_the_anchor_is_detected(database: Database) -> None:
    log = AuditLog(db=database, keyring=RING1)
    await _fill(log, 4)
    await log.purge(utcnow() + timedelta(seconds=1))
    await _fill(log, 2)
    await _sql(database, "UPDATE audit_records SET hash = :h WHERE kind = 'anchor'", h="f" * 64)

    report = await log.verify()
    assert not report.ok and report.first_broken_id == 4 and report.problem == "altered"

    await _sql(database, "DELETE FROM audit_records WHERE kind = 'anchor'")
    report = await log.verify()
    assert not report.ok and report.first_broken_id == 5 and report.problem == "deleted"


async def test_concurrent_writers_keep_one_linear_chain(database: Database) -> None:
    # Two engines (as two processes would have) and several logs per engine, all appending at once.
    async with Database(url=database.url.render_as_string(hide_password=False)) as second:
        logs = [
            AuditLog(db=database, keyring=RING1),
            AuditLog(db=database, keyring=RING1),
            AuditLog(db=second, keyring=RING1),
            AuditLog(db=second, keyring=RING1),
        ]
        await asyncio.gather(
            *(
                log.record("answer", conversation_id=i, actor=f"writer{w}", data={"i": i})
                for w, log in enumerate(logs)
                for i in range(15)
            )
        )

    report = await logs[0].verify()
    assert report.ok and report.checked == 60 and report.head_id == 60


async def test_empty_log_verifies(database: Database) -> None:
    report = await AuditLog(db=database, keyring=RING1).verify()
    assert report.ok and report.checked == 0 and report.head_id is None


# --- kefu audit (CLI) ------------------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A migrated SQLite database with a few records, configured through KEFU_* like production."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'kefu.db'}"

    async def prepare() -> None:
        await upgrade_async(url)
        async with Database(url=url) as db:
            log = AuditLog(db=db, keyring=RING1)
            await log.record("inbound", conversation_id=7, actor="customer:alice", data={"text": SECRET})
            await log.record("answer", conversation_id=7, actor="bot", data={"text": "好的"})

    asyncio.run(prepare())
    monkeypatch.setenv("KEFU_DATABASE_URL", url)
    monkeypatch.setenv("KEFU_AUDIT_KEY", f"k1:{K1}")
    return url


def test_cli_verify_exit_code_follows_the_chain(cli_env: str) -> None:
    runner = CliRunner()
    result = runner.invoke(audit_app, ["verify"])
    assert result.exit_code == 0, result.output
    assert "OK: 2 records" in result.output

    async def tamper() -> None:
        async with Database(url=cli_env) as db:
            await _sql(db, "UPDATE audit_records SET actor = 'someone-else' WHERE id = 1")

    asyncio.run(tamper())
    result = runner.invoke(audit_app, ["verify"])
    assert result.exit_code == 1
    assert "BROKEN at record 1 (altered)" in result.output


def test_cli_export_prints_decrypted_json_and_records_the_export(cli_env: str) -> None:
    runner = CliRunner()
    result = runner.invoke(audit_app, ["export", "--conversation", "7"])

    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["data"]["text"] for r in records] == [SECRET, "好的"]

    async def last_admin_record() -> dict[str, Any]:
        async with Database(url=cli_env) as db:
            log = AuditLog(db=db, keyring=RING1)
            assert (await log.verify()).checked == 3
            async with db.engine.connect() as conn:
                row = (await conn.execute(text("SELECT kind, actor FROM audit_records WHERE id = 3"))).one()
            return {"kind": row.kind, "actor": row.actor}

    assert asyncio.run(last_admin_record())["kind"] == "admin"


def test_cli_needs_the_key_and_keygen_makes_one(cli_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    monkeypatch.delenv("KEFU_AUDIT_KEY")
    result = runner.invoke(audit_app, ["export", "--conversation", "7"])
    assert result.exit_code == 2 and "KEFU_AUDIT_KEY" in result.output

    monkeypatch.setenv("KEFU_AUDIT_KEY", f"k9:{K2}")  # the wrong key
    result = runner.invoke(audit_app, ["export", "--conversation", "7"])
    assert result.exit_code == 1 and "unknown key id 'k1'" in result.output
    monkeypatch.setenv("KEFU_AUDIT_KEY", f"k1:{K1}")
    assert "OK: 2 records" in runner.invoke(audit_app, ["verify"]).output  # the failed export left no trace

    result = runner.invoke(audit_app, ["keygen", "--key-id", "k2"])
    assert result.exit_code == 0
    line = result.stdout.strip()
    assert line.startswith("k2:") and KeyRing.from_spec(line).key_ids == ("k2",)


def test_cli_purge_uses_the_retention_setting(cli_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def age_records() -> None:
        async with Database(url=cli_env) as db:
            await _sql(db, "UPDATE audit_records SET created_at = :old", old=utcnow() - timedelta(days=10))

    asyncio.run(age_records())
    runner = CliRunner()
    assert "0 audit records" in runner.invoke(audit_app, ["purge"]).output  # default 30 days
    monkeypatch.setenv("KEFU_AUDIT_RETENTION_DAYS", "7")
    result = runner.invoke(audit_app, ["purge"])
    assert result.exit_code == 0 and "2 audit records older than 7 days purged" in result.output
    assert runner.invoke(audit_app, ["verify"]).exit_code == 0
