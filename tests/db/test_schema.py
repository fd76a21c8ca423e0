"""Schema, migrations, persistence round trips and demo data, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, MetaData, String, func, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel, col, select

from core.db.database import Database, retrying
from core.db.migrate import alembic_config, current_revision, head_revision, upgrade, upgrade_async
from core.db.models import Conversation, Customer, CustomerIdentity, FaqEntry, Message, Order, Ticket
from core.demo import seed_demo
from core.errors import DatabaseError

PROJECT_ROOT = Path(__file__).resolve().parents[2]

TABLES = {
    "customers",
    "customer_identities",
    "orders",
    "conversations",
    "messages",
    "tickets",
    "faq_entries",
    "faq_learned",
    "faq_vectors",
    "audit_records",
}


def _table_names(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def _diff(conn: Connection, metadata: MetaData) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def _count(db: Database, model: type[SQLModel]) -> int:
    async with db.session() as s:
        return (await s.exec(select(func.count()).select_from(model))).one()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- migrations ---------------------------------------------------------------------------------


async def test_upgrade_creates_every_table(db_url: str) -> None:
    assert await current_revision(db_url) is None

    await upgrade_async(db_url)

    async with Database(url=db_url) as db, db.engine.connect() as conn:
        tables = await conn.run_sync(_table_names)
    assert tables == TABLES | {"alembic_version"}
    assert set(SQLModel.metadata.tables) == TABLES
    assert await current_revision(db_url) == head_revision()


async def test_migrated_schema_matches_models(database: Database) -> None:
    async with database.engine.connect() as conn:
        diff = await conn.run_sync(_diff, SQLModel.metadata)
    assert diff == []


async def test_model_drift_would_be_detected(database: Database) -> None:
    # The comparison above must be able to fail: a column added to a model without a migration shows.
    drifted = MetaData(naming_convention=SQLModel.metadata.naming_convention)
    for table in SQLModel.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["tickets"].append_column(Column("assignee", String(64), nullable=True))

    async with database.engine.connect() as conn:
        diff = await conn.run_sync(_diff, drifted)
    assert [(d[0], d[2], d[3].name) for d in diff] == [("add_column", "tickets", "assignee")]


async def test_second_upgrade_is_a_no_op(database: Database) -> None:
    async with database.session() as s:
        s.add(FaqEntry(question="Q", answer="A"))
        await s.commit()

    await upgrade_async(database.url.render_as_string(hide_password=False))

    assert await _count(database, FaqEntry) == 1
    async with database.engine.connect() as conn:
        versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    assert [v[0] for v in versions] == [head_revision()]


async def test_concurrent_upgrades_in_one_process(db_url: str) -> None:
    await asyncio.gather(upgrade_async(db_url), upgrade_async(db_url), upgrade_async(db_url))

    assert await current_revision(db_url) == head_revision()


_UPGRADER = """
import sys
from core.db.migrate import upgrade
print("ready", flush=True)
sys.stdin.readline()  # start together
upgrade(sys.argv[1])
print("done", flush=True)
"""


async def test_concurrent_upgrades_from_separate_processes(db_url: str) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _UPGRADER,
            db_url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=PROJECT_ROOT,
        )
        for _ in range(2)
    ]
    for proc in procs:  # every process has imported alembic and the models
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"ready\n"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
    results = [await proc.communicate() for proc in procs]

    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()
        assert out == b"done\n"
    assert await current_revision(db_url) == head_revision()


async def test_upgrade_creates_the_sqlite_folder(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'var' / 'lib' / 'kefu.db'}"

    await asyncio.to_thread(upgrade, url)

    async with Database(url=url) as db:
        assert await db.ping()
        async with db.engine.connect() as conn:
            journal = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
            foreign_keys = (await conn.execute(text("PRAGMA foreign_keys"))).scalar_one()
    assert (tmp_path / "var" / "lib" / "kefu.db").is_file()
    assert journal == "wal"
    assert foreign_keys == 1


# --- round trips ------------------------------------------------------------------------------


async def test_conversation_with_messages_round_trip(database: Database) -> None:
    tool_calls = [{"id": "call_1", "name": "get_order", "arguments": {"order_id": "KF20251103001"}}]
    async with database.session() as s:
        conv = Conversation(
            key="telegram:42",
            channel="telegram",
            user_id="42",
            pinned={"order_id": "KF20251103001", "phone": "13800138000", "备注": "周末送货"},
        )
        s.add(conv)
        await s.flush()
        assert conv.id is not None
        s.add_all(
            [
                Message(
                    conversation_id=conv.id, role="user", content="我的订单到哪了？", platform_message_id="7"
                ),
                Message(conversation_id=conv.id, role="assistant", tool_calls=tool_calls),
                Message(
                    conversation_id=conv.id,
                    role="tool",
                    tool_name="get_order",
                    tool_call_id="call_1",
                    content='{"status": "shipped"}',
                ),
                Message(
                    conversation_id=conv.id,
                    role="assistant",
                    content="您的订单已发货。",
                    source="model",
                    meta={"latency_ms": 812, "prompt_tokens": 1530, "eval_tokens": 42},
                ),
            ]
        )
        await s.commit()
        conv_id = conv.id

    async with database.session() as s:
        loaded = (await s.exec(select(Conversation).where(Conversation.key == "telegram:42"))).one()
        messages = (
            await s.exec(select(Message).where(Message.conversation_id == conv_id).order_by(col(Message.id)))
        ).all()
    assert loaded.pinned == {"order_id": "KF20251103001", "phone": "13800138000", "备注": "周末送货"}
    assert loaded.state == "bot" and loaded.summary == ""
    assert [m.role for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[0].content == "我的订单到哪了？" and messages[0].platform_message_id == "7"
    assert messages[1].tool_calls == tool_calls
    assert messages[2].tool_name == "get_order" and messages[2].tool_call_id == "call_1"
    assert messages[3].meta == {"latency_ms": 812, "prompt_tokens": 1530, "eval_tokens": 42}
    assert messages[0].tool_calls is None and messages[0].meta == {}


async def test_conversation_key_is_unique(database: Database) -> None:
    async with database.session() as s:
        s.add(Conversation(key="web:abc", channel="web", user_id="u"))
        await s.commit()
    async with database.session() as s:
        s.add(Conversation(key="web:abc", channel="web", user_id="u"))
        with pytest.raises(IntegrityError):
            await s.commit()


async def test_ticket_idempotency_key_rejects_a_duplicate(database: Database) -> None:
    async with database.session() as s:
        s.add(Ticket(summary="退款未到账", idempotency_key="conv-1:refund"))
        s.add(Ticket(summary="no key 1"))
        s.add(Ticket(summary="no key 2"))  # several tickets without a key are fine
        await s.commit()

    async with database.session() as s:
        s.add(Ticket(summary="退款未到账 (retry)", idempotency_key="conv-1:refund"))
        with pytest.raises(IntegrityError):
            await s.commit()

    async with database.session() as s:
        tickets = (await s.exec(select(Ticket).order_by(col(Ticket.id)))).all()
    assert [t.summary for t in tickets] == ["退款未到账", "no key 1", "no key 2"]
    assert tickets[0].status == "open" and tickets[0].priority == "normal"


async def test_foreign_keys_are_enforced(database: Database) -> None:
    async with database.session() as s:
        s.add(Message(conversation_id=999_999, role="user", content="orphan"))
        with pytest.raises(IntegrityError):
            await s.commit()


async def test_faq_entries_keep_alternatives_and_tags(database: Database) -> None:
    async with database.session() as s:
        s.add(
            FaqEntry(
                question="怎么开发票？",
                alternatives=["能开发票吗", "电子发票在哪下载"],
                answer="下单时填写抬头即可。",
                tags=["发票"],
            )
        )
        s.add(FaqEntry(question="Invoice?", alternatives=["receipt"], answer="At checkout.", language="en"))
        await s.commit()

    async with database.session() as s:
        zh = (await s.exec(select(FaqEntry).where(FaqEntry.language == "zh"))).all()
    assert len(zh) == 1
    assert zh[0].alternatives == ["能开发票吗", "电子发票在哪下载"]
    assert zh[0].tags == ["发票"] and zh[0].enabled is True


async def test_timestamps_come_back_timezone_aware(database: Database) -> None:
    shanghai = timezone(timedelta(hours=8))
    placed = datetime(2025, 11, 3, 10, 15, tzinfo=shanghai)
    async with database.session() as s:
        s.add(Order(id="KF1", status="paid", created_at=placed, updated_at=placed))
        s.add(Customer(name="Ann"))
        await s.commit()

    async with database.session() as s:
        order = (await s.exec(select(Order))).one()
        customer = (await s.exec(select(Customer))).one()
    assert order.created_at == placed  # the same instant...
    assert order.created_at.utcoffset() == timedelta(0)  # ...handed back in UTC
    assert customer.created_at.tzinfo is not None
    assert customer.created_at.utcoffset() == timedelta(0)


async def test_updating_a_row_moves_updated_at(database: Database) -> None:
    old = datetime(2025, 1, 1, tzinfo=UTC)
    async with database.session() as s:
        ticket = Ticket(summary="s", created_at=old, updated_at=old)
        s.add(ticket)
        await s.commit()
        ticket.status = "closed"
        s.add(ticket)
        await s.commit()

    async with database.session() as s:
        loaded = (await s.exec(select(Ticket))).one()
    assert loaded.status == "closed"
    assert loaded.created_at == old
    assert loaded.updated_at > old


# --- demo data ----------------------------------------------------------------------------------


async def test_seed_demo_is_idempotent(database: Database) -> None:
    first = await seed_demo(database)
    counts = {m: await _count(database, m) for m in (Customer, CustomerIdentity, Order, FaqEntry)}
    second = await seed_demo(database)

    assert first["customers"] == 5 and first["customer_identities"] == 2 and first["orders"] == 10
    assert first["faq_entries"] >= 40
    assert second == dict.fromkeys(first, 0)
    assert counts == {m: await _count(database, m) for m in (Customer, CustomerIdentity, Order, FaqEntry)}
    assert counts[FaqEntry] == first["faq_entries"]


async def test_demo_web_user_owns_orders_in_every_status(database: Database) -> None:
    await seed_demo(database)

    async with database.session() as s:
        identity = (
            await s.exec(
                select(CustomerIdentity).where(
                    CustomerIdentity.channel == "web", CustomerIdentity.platform_user_id == "demo"
                )
            )
        ).one()
        orders = (await s.exec(select(Order).where(Order.customer_id == identity.customer_id))).all()
        all_orders = (await s.exec(select(Order))).all()
        faq = (await s.exec(select(FaqEntry))).all()
    assert {o.status for o in orders} >= {"paid", "shipped", "delivered", "refunding"}
    assert {o.status for o in all_orders} >= {"paid", "shipped", "delivered", "cancelled", "refunding"}
    for order in all_orders:
        assert order.id.startswith("KF") and len(order.id) == 13
        assert order.total_cents == sum(i["quantity"] * i["unit_price_cents"] for i in order.items)
        if order.status == "shipped":
            assert order.carrier and order.tracking_number and order.eta
    assert {f.language for f in faq} == {"zh", "en"}
    assert all(len(f.alternatives) >= 2 and f.tags for f in faq)


# --- availability -------------------------------------------------------------------------------


async def test_ping_answers_true_on_a_live_database(database: Database) -> None:
    assert await database.ping() is True


async def test_unreachable_postgres_is_reported_not_raised_raw() -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/test"
    async with Database(url=url) as db:
        assert await db.ping() is False
        with pytest.raises(DatabaseError, match="unreachable"):
            await db.check()
    with pytest.raises(DatabaseError):
        await upgrade_async(url)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@pytest.mark.postgres
async def test_retrying_waits_for_postgres_to_come_back(pg_database: str) -> None:
    port = _closed_port()
    servers: list[asyncio.Server] = []

    async def forward(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", 5432)
        await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))

    calls = 0

    async def select_one() -> int:
        nonlocal calls
        calls += 1
        if calls == 3:  # the server "comes back" after two refused connections
            servers.append(await asyncio.start_server(forward, "127.0.0.1", port))
        async with db.engine.connect() as conn:
            return int((await conn.execute(text("SELECT 41 + 1"))).scalar_one())

    db = Database(url=f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{pg_database}")
    try:
        assert await retrying(select_one, attempts=5, initial_wait=0.01) == 42
        assert calls == 3
    finally:
        await db.aclose()
        for server in servers:
            server.close()


async def test_retrying_gives_up_with_a_database_error() -> None:
    db = Database(url=f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/test")
    calls = 0

    async def select_one() -> None:
        nonlocal calls
        calls += 1
        async with db.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    try:
        with pytest.raises(DatabaseError, match="after 3 attempts"):
            await retrying(select_one, attempts=3, initial_wait=0.01)
    finally:
        await db.aclose()
    assert calls == 3


async def test_retrying_does_not_repeat_a_rejected_write(database: Database) -> None:
    calls = 0

    async def insert_duplicate() -> None:
        nonlocal calls
        calls += 1
        async with database.session() as s:
            s.add(Ticket(summary="a", idempotency_key="k"))
            s.add(Ticket(summary="b", idempotency_key="k"))
            await s.commit()

    with pytest.raises(IntegrityError):
        await retrying(insert_duplicate, initial_wait=0.01)
    assert calls == 1


async def test_downgrade_to_base_and_back(database: Database) -> None:
    url = database.url.render_as_string(hide_password=False)
    await asyncio.to_thread(command.downgrade, alembic_config(url), "base")

    async with database.engine.connect() as conn:
        assert await conn.run_sync(_table_names) == {"alembic_version"}
    assert await current_revision(url) is None

    await upgrade_async(url)
    assert await current_revision(url) == head_revision()
