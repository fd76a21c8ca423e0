"""The inbox contract.

A gateway ``put``s a message before it acknowledges the platform; a worker ``claim``s entries, answers
them, then ``ack``s. An entry claimed by a worker that died is ``reclaim``ed by another after
``min_idle`` seconds. An entry that keeps failing is moved to the dead-letter list for operators.
``MemoryInbox`` serves the embedded default (one process); ``RedisInbox`` (Redis Streams with a consumer
group) serves deployments with several processes. One contract test suite runs against both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence

from pydantic import BaseModel, ConfigDict

from core.messages import InboundMessage
from core.stores.base import Admission, AdmissionRequest, StateStore


class InboxEntry(BaseModel):
    """A claimed message: ``entry_id`` is the queue's id, ``deliveries`` how often it was claimed."""

    model_config = ConfigDict(frozen=True)

    entry_id: str
    message: InboundMessage
    deliveries: int = 1


class DeadLetter(BaseModel):
    model_config = ConfigDict(frozen=True)

    entry_id: str
    message: InboundMessage
    reason: str


AdmitAndPut = Callable[[InboundMessage, AdmissionRequest], Awaitable[Admission | None]]
""":meth:`StateStore.admit` and, when admitted, :meth:`Inbox.put` as one atomic step.

The admitted message is queued with its sequence number (and the rate-limit notice flag) in its extras,
exactly as the intake would have put it. Raises StoreError when it cannot; then nothing was marked,
counted or queued.
"""


class Inbox(ABC):
    """A durable, at-least-once queue of inbound messages shared by all workers."""

    def admit_and_put(self, store: StateStore) -> AdmitAndPut | None:
        """A one-step admission into this inbox with ``store``'s marks and counters, when both live on
        one server (one round trip instead of two, and nothing to undo); None otherwise."""
        return None

    @abstractmethod
    async def put(self, message: InboundMessage) -> str:
        """Store ``message`` durably; returns its entry id. Raises StoreError when it cannot."""

    @abstractmethod
    async def claim(self, consumer: str, *, count: int = 16, block: float = 1.0) -> list[InboxEntry]:
        """Up to ``count`` new entries for ``consumer``, waiting up to ``block`` seconds for one."""

    @abstractmethod
    async def ack(self, entry_id: str) -> None:
        """The entry is done (answered or dead-lettered): it is never delivered again."""

    @abstractmethod
    async def reclaim(self, consumer: str, *, min_idle: float, count: int = 16) -> list[InboxEntry]:
        """Entries claimed (by anyone) and not acknowledged for ``min_idle`` seconds, now ``consumer``'s."""

    async def touch(self, consumer: str, entry_ids: Sequence[str]) -> None:  # noqa: B027 - optional
        """``consumer`` is still working on these entries: reset their idle time so none is reclaimed."""

    @abstractmethod
    async def dead_letter(self, entry: InboxEntry, reason: str) -> None:
        """Move an entry that keeps failing out of the queue, keeping it for operators."""

    @abstractmethod
    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]: ...

    @abstractmethod
    async def depth(self) -> int:
        """Entries not yet acknowledged (waiting or being processed)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to close by default
        """Release connections."""

    async def __aenter__(self) -> Inbox:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
