"""FAQ wordings learned from customers' picks among the fallback's suggestions: ``faq_learned``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "faq_learned",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("entry_id", sa.Integer(), nullable=False),
        sa.Column("phrasing", sa.Text(), nullable=False),
        sa.Column("phrasing_key", sa.String(length=64), nullable=False),
        sa.Column("picks", sa.Integer(), nullable=False),
        sa.Column("last_pick", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["faq_entries.id"],
            name=op.f("fk_faq_learned_entry_id_faq_entries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_faq_learned")),
        sa.UniqueConstraint("entry_id", "phrasing_key", name=op.f("uq_faq_learned_entry_id_phrasing_key")),
    )
    op.create_index(op.f("ix_faq_learned_entry_id"), "faq_learned", ["entry_id"], unique=False)
    op.create_index(op.f("ix_faq_learned_status"), "faq_learned", ["status"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_faq_learned_status"), table_name="faq_learned")
    op.drop_index(op.f("ix_faq_learned_entry_id"), table_name="faq_learned")
    op.drop_table("faq_learned")
