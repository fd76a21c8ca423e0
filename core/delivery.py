"""Outbound side of the core: one ReplySender per channel, implemented by the platform adapters.

Sending text is the only required method. ``deliver`` receives the engine's event stream; the default
waits for the final reply and sends it, streaming platforms (Telegram edits, Slack updates, the web chat)
override it to show text as it is written.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable

from core.messages import InboundMessage, Reply, ReplyDone, ReplyEvent

log = logging.getLogger(__name__)


class ReplySender(ABC):
    """Delivers replies on one channel (``channel`` matches ``ConversationKey.channel``)."""

    channel: str

    @abstractmethod
    async def send(self, reply: Reply) -> None:
        """Deliver ``reply``: render, split at the platform limit, retry on rate limits.

        Raises DeliveryError when the platform refuses it for good.
        """

    async def deliver(self, message: InboundMessage, events: AsyncIterator[ReplyEvent]) -> Reply:
        """Answer ``message`` from the engine's events; returns the final reply that was sent."""
        final: Reply | None = None
        async for event in events:
            if isinstance(event, ReplyDone):
                final = event.reply
        if final is None:
            raise RuntimeError("engine stream ended without a reply")
        await self.send(final)
        return final

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to close by default
        """Close the platform client (called after the worker has finished)."""


class SenderRegistry:
    """The senders of the enabled platforms, by channel."""

    def __init__(self, senders: Iterable[ReplySender] = ()) -> None:
        self._senders: dict[str, ReplySender] = {}
        for sender in senders:
            self.add(sender)

    def add(self, sender: ReplySender) -> None:
        self._senders[sender.channel] = sender

    def get(self, channel: str) -> ReplySender | None:
        return self._senders.get(channel)

    def channels(self) -> list[str]:
        return sorted(self._senders)

    async def aclose(self) -> None:
        for sender in self._senders.values():
            try:
                await sender.aclose()
            except Exception:
                log.warning("closing the %s sender failed", sender.channel, exc_info=True)
