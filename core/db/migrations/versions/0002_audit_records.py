"""Audit log: the append-only, hash-chained, encrypted ``audit_records`` table.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_records",
        # Assigned by the writer (previous id + 1 under the append lock), so no sequence/SERIAL.
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("conversation_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_records")),
    )
    op.create_index(
        op.f("ix_audit_records_conversation_id"), "audit_records", ["conversation_id"], unique=False
    )
    op.create_index(op.f("ix_audit_records_created_at"), "audit_records", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_records_created_at"), table_name="audit_records")
    op.drop_index(op.f("ix_audit_records_conversation_id"), table_name="audit_records")
    op.drop_table("audit_records")
