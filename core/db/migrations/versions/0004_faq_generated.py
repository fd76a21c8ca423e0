"""Phrasings the model writes for FAQ entries: ``faq_entries.generated`` and ``generated_for``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("faq_entries") as batch:
        batch.add_column(sa.Column("generated", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("generated_for", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("faq_entries") as batch:
        batch.drop_column("generated_for")
        batch.drop_column("generated")
