"""Accepting inbound messages: dedupe on the platform's message id, then the durable inbox.

Platforms retry (WeChat three times within 15 s, Slack on a slow ack, Telegram until it gets a 2xx), and
every gateway replica may receive the retry. The dedupe mark lives in the shared store, so a message is
accepted once however many replicas see it. When the inbox cannot take the message the mark is removed
and the error propagates: the gateway answers with an error status and the platform's retry will try
again, so nothing acknowledged is lost.
"""

from __future__ import annotations

import logging
from enum import StrEnum

from core.inbox.base import Inbox
from core.messages import InboundMessage
from core.stores.base import StateStore

log = logging.getLogger(__name__)

DEDUPE_TTL = 7 * 24 * 3600.0
"""Telegram update ids may repeat after a week of silence; platform retries come within minutes."""


class Accepted(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"


def dedupe_key(message: InboundMessage) -> str:
    return f"seen:{message.key.channel}:{message.message_id}"


class Intake:
    def __init__(self, *, store: StateStore, inbox: Inbox, dedupe_ttl: float = DEDUPE_TTL) -> None:
        self._store = store
        self._inbox = inbox
        self._dedupe_ttl = dedupe_ttl

    @property
    def inbox(self) -> Inbox:
        return self._inbox

    async def accept(self, message: InboundMessage) -> Accepted:
        """Queue ``message`` unless the same platform message was accepted before."""
        key = dedupe_key(message)
        if not await self._store.set_if_absent(key, "1", ttl=self._dedupe_ttl):
            log.info(
                "duplicate delivery ignored",
                extra={"conversation": str(message.key), "message_id": message.message_id},
            )
            return Accepted.DUPLICATE
        try:
            await self._inbox.put(message)
        except BaseException:
            await self._store.delete(key)
            raise
        return Accepted.NEW
