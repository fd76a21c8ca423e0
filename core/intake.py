"""Accepting inbound messages: dedupe, rate limits, a per-conversation sequence number, the durable inbox.

Platforms retry (WeChat three times within 15 s, Slack on a slow ack, Telegram until it gets a 2xx), and
every gateway replica may receive the retry. The dedupe mark lives in the shared store, so a message is
accepted once however many replicas see it. When the inbox cannot take the message the mark is removed
and the error propagates: the gateway answers with an error status and the platform's retry will try
again, so nothing acknowledged is lost. On Redis (:meth:`Inbox.admit_and_put`) marking, counting,
numbering and queueing are one script, one round trip, and a failure writes nothing at all.

Each accepted message gets the next number of its conversation (``extras["_seq"]``, a counter in the
shared store). Workers in any process answer number n only after number n-1 is done, so a conversation
is answered in the order its messages were accepted even when two processes claim them.

A user or conversation over its per-minute limit gets one polite notice per minute
(``extras["_notice"]``, answered by the worker without the model); further messages in that minute are
dropped (:attr:`Accepted.LIMITED`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum

from core import metrics
from core.inbox.base import Inbox
from core.messages import ConversationKey, InboundMessage
from core.stores.base import AdmissionRequest, Counter, StateStore

log = logging.getLogger(__name__)

DEDUPE_TTL = 7 * 24 * 3600.0
"""Telegram update ids may repeat after a week of silence; platform retries come within minutes."""

SEQ_TTL = 30 * 24 * 3600.0
"""Lifetime of a conversation's sequence counter, from its first message; it then starts again at 1."""

DONE_TTL = 7 * 24 * 3600.0
"""How long a "message n is done" mark is kept: far longer than any message waits in the inbox."""

SEQ_FIELD = "_seq"
NOTICE_FIELD = "_notice"
RATE_NOTICE = "rate_limited"
RATE_WINDOW = 60.0


class Accepted(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    LIMITED = "limited"
    """Over the rate limit after the notice was already sent: not queued, not answered."""


@dataclass(frozen=True)
class RateLimits:
    """Messages per minute; 0 turns a limit off."""

    per_user: int = 20
    per_conversation: int = 60


def dedupe_key(message: InboundMessage) -> str:
    return f"seen:{message.key.channel}:{message.message_id}"


def seq_key(key: ConversationKey) -> str:
    return f"seq:{key}"


def done_prefix(key: ConversationKey) -> str:
    return f"done:{key}:"


def done_key(key: ConversationKey, seq: int) -> str:
    """Set once message number ``seq`` of the conversation was answered, dead-lettered or abandoned."""
    return f"{done_prefix(key)}{seq}"


def sequence_of(message: InboundMessage) -> int | None:
    """The message's number in its conversation, when the intake gave it one."""
    value = message.extras.get(SEQ_FIELD)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Intake:
    """Accepts each platform message once and queues it for the workers."""

    def __init__(
        self,
        *,
        store: StateStore,
        inbox: Inbox,
        dedupe_ttl: float = DEDUPE_TTL,
        rate_limits: RateLimits | None = None,
    ) -> None:
        self._store = store
        self._inbox = inbox
        self._dedupe_ttl = dedupe_ttl
        self._limits = rate_limits or RateLimits(per_user=0, per_conversation=0)
        # On Redis the admission and the XADD are one script: one round trip, and nothing to undo.
        self._admit_and_put = inbox.admit_and_put(store)

    @property
    def inbox(self) -> Inbox:
        return self._inbox

    async def accept(self, message: InboundMessage) -> Accepted:
        """Queue ``message`` unless the same platform message was accepted before."""
        extra = {"conversation": str(message.key), "message_id": message.message_id}
        key = dedupe_key(message)
        request = AdmissionRequest(
            mark=key,
            mark_ttl=self._dedupe_ttl,
            counters=self._counters(message),
            sequence=seq_key(message.key),
            sequence_ttl=SEQ_TTL,
            # A "done" mark left by an earlier run of the counter (it expired and restarted) is not
            # about this message, which cannot have been answered before it is queued.
            clear_prefix=done_prefix(message.key),
        )
        # Dedupe mark, rate counters, sequence number: one atomic step, which on Redis queues the
        # message too (otherwise it is put in the inbox below).
        if self._admit_and_put is not None:
            admission = await self._admit_and_put(message, request)
        else:
            admission = await self._store.admit(request)
        if admission is None:
            log.info("duplicate delivery ignored", extra=extra)
            metrics.message_received(message.key.channel, "duplicate")
            return Accepted.DUPLICATE
        seq = admission.sequence
        if seq is None:
            log.info("message over the rate limit dropped", extra=extra)
            metrics.message_received(message.key.channel, "limited")
            return Accepted.LIMITED
        if admission.first_over:
            log.info("message over the rate limit; a notice will answer it", extra=extra)
        if self._admit_and_put is None:
            await self._put(message, key, seq, notice=admission.first_over)
        metrics.message_received(message.key.channel, "new")
        return Accepted.NEW

    async def _put(self, message: InboundMessage, mark: str, seq: int, *, notice: bool) -> None:
        """Queue an admitted message; when the inbox refuses it, undo the admission and raise."""
        extras = {**message.extras, SEQ_FIELD: seq}
        if notice:
            extras[NOTICE_FIELD] = RATE_NOTICE
        try:
            await self._inbox.put(message.model_copy(update={"extras": extras}))
        except BaseException:
            await self._store.delete(mark)
            await self._skip(message.key, seq)
            raise

    def _counters(self, message: InboundMessage) -> list[Counter]:
        """The per-minute counters of this message's user and conversation that have a limit."""
        window = int(time.time() // RATE_WINDOW)
        return [
            Counter(key=name, limit=limit, ttl=2 * RATE_WINDOW)
            for limit, name in (
                (self._limits.per_user, f"rate:user:{message.key.channel}:{message.user_id}:{window}"),
                (self._limits.per_conversation, f"rate:conversation:{message.key}:{window}"),
            )
            if limit > 0
        ]

    async def _skip(self, key: ConversationKey, seq: int) -> None:
        """Number ``seq`` will never be queued: let the conversation's next message go ahead."""
        try:
            await self._store.set(done_key(key, seq), "skipped", ttl=DONE_TTL)
        except Exception:
            # The worker holding the next message stops waiting after its order timeout.
            log.warning("could not mark skipped message %d of %s", seq, key, exc_info=True)
