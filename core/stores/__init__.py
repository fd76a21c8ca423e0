"""Shared state: a :class:`~core.stores.base.StateStore` with in-process and Redis twins."""
