"""The agent console under ``/admin``: live conversations, hand-off, tickets, FAQ editor, audit search."""

from __future__ import annotations

from bots.admin.routes import routes

__all__ = ["routes"]
