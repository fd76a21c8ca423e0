"""SQL persistence: SQLModel tables, the async engine, Alembic migrations."""
