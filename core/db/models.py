"""SQLModel tables: conversations and their messages, customers and their platform identities,
orders (demo business data), tickets, FAQ entries with the wordings learned from customers' picks, and
the audit log.

Timestamps are timezone-aware UTC. JSON columns hold lists/dicts and work on SQLite and PostgreSQL.
Schema changes go through Alembic (``core/db/migrations``); ``kefu db upgrade`` applies them.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    LargeBinary,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel

# Named constraints: SQLite migrations (batch mode) can only drop or alter constraints that have a
# name, and PostgreSQL and SQLite then agree on every name. Set before any table is declared.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE`` that always hands back aware UTC datetimes.

    SQLite has no time zone type: SQLAlchemy stores the value as text and returns it naive. Values
    are converted to UTC on the way in (naive ones are taken as UTC) and tagged UTC on the way out.
    Migrations render it as ``sa.DateTime(timezone=True)``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _ts(*, index: bool = False, onupdate: bool = False) -> Any:
    # onupdate: the ORM refreshes ``updated_at`` on every UPDATE it emits.
    return Field(
        default_factory=utcnow,
        sa_type=UTCDateTime,
        nullable=False,
        index=index,
        sa_column_kwargs={"onupdate": utcnow} if onupdate else {},
    )


class Customer(SQLModel, table=True):
    __tablename__ = "customers"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200)
    phone: str | None = Field(default=None, max_length=40)
    email: str | None = Field(default=None, max_length=200)
    created_at: datetime = _ts()


class CustomerIdentity(SQLModel, table=True):
    """Links a platform user (channel + platform user id) to a customer record."""

    __tablename__ = "customer_identities"
    __table_args__ = (UniqueConstraint("channel", "platform_user_id"),)

    id: int | None = Field(default=None, primary_key=True)
    customer_id: int = Field(foreign_key="customers.id", index=True)
    channel: str = Field(max_length=32)
    platform_user_id: str = Field(max_length=128)
    created_at: datetime = _ts()


class Order(SQLModel, table=True):
    __tablename__ = "orders"

    id: str = Field(primary_key=True, max_length=64)
    """The order number customers quote (e.g. ``KF20251103001``)."""
    customer_id: int | None = Field(default=None, foreign_key="customers.id", index=True)
    status: str = Field(max_length=32)
    carrier: str | None = Field(default=None, max_length=64)
    tracking_number: str | None = Field(default=None, max_length=64)
    eta: date | None = None
    items: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    total_cents: int = 0
    currency: str = Field(default="CNY", max_length=8)
    created_at: datetime = _ts()
    updated_at: datetime = _ts(onupdate=True)


class Conversation(SQLModel, table=True):
    __tablename__ = "conversations"

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=255, unique=True, index=True)
    """``str(ConversationKey)``: channel:chat[:thread]."""
    channel: str = Field(max_length=32, index=True)
    user_id: str = Field(max_length=128)
    language: str = Field(default="zh", max_length=8)
    state: str = Field(default="bot", max_length=16, index=True)
    """bot | waiting | agent (hand-off)."""
    summary: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    pinned: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """Pinned facts ([MEMORY]): order numbers, contact details the customer gave."""
    summarized_upto: int = 0
    """Id of the last message folded into ``summary``."""
    created_at: datetime = _ts()
    updated_at: datetime = _ts(index=True, onupdate=True)


class Message(SQLModel, table=True):
    """One turn part: a customer message, an answer, a tool call request or a tool result."""

    __tablename__ = "messages"

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int = Field(foreign_key="conversations.id", index=True)
    role: str = Field(max_length=16)
    """user | assistant | tool | agent | system."""
    content: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    tool_calls: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    tool_name: str | None = Field(default=None, max_length=64)
    tool_call_id: str | None = Field(default=None, max_length=64)
    platform_message_id: str | None = Field(default=None, max_length=128, index=True)
    source: str | None = Field(default=None, max_length=32)
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """Latency, token counts, error class: what the admin transcript shows."""
    created_at: datetime = _ts()


class Ticket(SQLModel, table=True):
    __tablename__ = "tickets"

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int | None = Field(default=None, foreign_key="conversations.id", index=True)
    customer_id: int | None = Field(default=None, foreign_key="customers.id", index=True)
    summary: str = Field(sa_column=Column(Text, nullable=False))
    category: str = Field(default="general", max_length=32)
    priority: str = Field(default="normal", max_length=16)
    contact: str | None = Field(default=None, max_length=200)
    status: str = Field(default="open", max_length=16, index=True)
    idempotency_key: str | None = Field(default=None, max_length=128, unique=True)
    created_at: datetime = _ts()
    updated_at: datetime = _ts(onupdate=True)


class FaqEntry(SQLModel, table=True):
    __tablename__ = "faq_entries"

    id: int | None = Field(default=None, primary_key=True)
    question: str = Field(sa_column=Column(Text, nullable=False))
    alternatives: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    answer: str = Field(sa_column=Column(Text, nullable=False))
    language: str = Field(default="zh", max_length=8, index=True)
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    enabled: bool = True
    generated: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    """Phrasings the model wrote for the entry (``core.faq.phrasings``): indexed for retrieval only."""
    generated_for: str | None = Field(default=None, max_length=64)
    """Hash of the question and answer ``generated`` was written for: an edit makes them stale."""
    created_at: datetime = _ts()
    updated_at: datetime = _ts(onupdate=True)


class FaqLearned(SQLModel, table=True):
    """A customer's wording that led to an FAQ entry: they picked the entry from the fallback's
    suggestions. An operator accepts it (it becomes one of the entry's alternatives) or rejects it."""

    __tablename__ = "faq_learned"
    __table_args__ = (UniqueConstraint("entry_id", "phrasing_key"),)

    id: int | None = Field(default=None, primary_key=True)
    entry_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("faq_entries.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    phrasing: str = Field(sa_column=Column(Text, nullable=False))
    phrasing_key: str = Field(max_length=64)
    """sha256 of the normalised phrasing: one row per wording and entry."""
    picks: int = 1
    last_pick: str | None = Field(default=None, max_length=64)
    """Which pick was counted last (hash of conversation and message): a re-processed one counts once."""
    status: str = Field(default="pending", max_length=16, index=True)
    """pending | accepted | rejected."""
    created_at: datetime = _ts()
    updated_at: datetime = _ts(onupdate=True)


class FaqVector(SQLModel, table=True):
    """The embedding of one FAQ phrasing in one view, kept so that a process that starts, or another
    replica, does not embed every phrasing again (``core.faq.vectors``)."""

    __tablename__ = "faq_vectors"

    key: str = Field(primary_key=True, max_length=64)
    """sha256 of the embedder's name, the view and the text."""
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    """float32 values, little-endian."""
    created_at: datetime = _ts()


class AuditRecord(SQLModel, table=True):
    """One entry of the append-only audit log (see ``core.audit``).

    ``payload`` is the record's data encrypted under key ``key_id``; ``hash`` chains each record to the
    one before it (``prev_hash``), so a deleted, altered or reordered record is detected. Ids are
    assigned by the writer (last id + 1 under a lock), never by the database: two writers can never
    both extend the chain from the same record. A ``kind="anchor"`` row stands in for purged records.
    """

    __tablename__ = "audit_records"

    id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    created_at: datetime = _ts(index=True)
    kind: str = Field(max_length=32)
    """inbound | answer | tool_call | tool_result | guard | admin | handoff | anchor ..."""
    conversation_id: int | None = Field(default=None, index=True)
    """Plain (not a foreign key): records outlive pruned conversations and are looked up by it."""
    actor: str = Field(max_length=128)
    key_id: str = Field(max_length=32)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)
