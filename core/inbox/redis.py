"""Redis Streams :class:`Inbox`: one stream and one consumer group shared by every kefu process.

``put`` is ``XADD``, and the intake's ``admit_and_put`` is one Lua script that dedupes, counts, numbers
and ``XADD``s (the sequence number travels as a field beside the message); concurrent requests' calls
share pipelines (:mod:`core.stores.pipelining`). ``claim`` is ``XREADGROUP`` (an entry goes to exactly
one consumer and stays in the group's pending list until acknowledged); ``ack`` is ``XACK`` + ``XDEL``
in one transaction, so the stream holds only unfinished entries and ``XLEN`` is the depth; ``reclaim``
is ``XAUTOCLAIM``, and the delivery count comes from the pending list (``XPENDING``), which Redis
increments on every claim. Dead letters go to a second stream. A consumer group that vanished (Redis
restarted without persistence, the stream was deleted) is created again from the start of the stream,
so entries written before it are not skipped.
Every redis-py error leaves this module as a :class:`~core.errors.StoreError`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from core.errors import ConfigError, StoreError
from core.inbox.base import AdmitAndPut, DeadLetter, Inbox, InboxEntry
from core.intake import NOTICE_FIELD, RATE_NOTICE, SEQ_FIELD
from core.messages import InboundMessage
from core.stores.base import Admission, AdmissionRequest, StateStore
from core.stores.pipelining import Pipeliner
from core.stores.redis import RedisStore, admission_of, connect, counter_args, milliseconds

log = logging.getLogger(__name__)

# Touch only entries this consumer still owns: XCLAIM alone would steal an entry back from a consumer
# that reclaimed it after we looked idle. JUSTID leaves the delivery counter alone.
_TOUCH_SCRIPT = """
local taken = {}
for i, id in ipairs(ARGV) do
    if i > 1 then
        local p = redis.call('XPENDING', KEYS[1], KEYS[2], id, id, 1)
        if p[1] then
            if p[1][2] == ARGV[1] then
                redis.call('XCLAIM', KEYS[1], KEYS[2], ARGV[1], 0, id, 'JUSTID')
            else
                table.insert(taken, id)
            end
        end
    end
end
return taken
"""


# StateStore.admit and XADD in one step (RedisInbox.admit_and_put). KEYS: mark, sequence, stream,
# counters...; ARGV: mark ttl ms, sequence ttl ms, the done marks' prefix, the message JSON, the stream's
# bound (0: none), then limit and ttl ms per counter. Everything is read first and XADD, the one
# command that could fail, comes before any write: a failure leaves no mark, count or number behind.
_ADMIT_AND_PUT_SCRIPT = """
if redis.call('exists', KEYS[1]) == 1 then
    return false
end
local bound = tonumber(ARGV[5])
if bound > 0 and redis.call('xlen', KEYS[3]) >= bound then
    return {-1, 0}
end
local first_over, over = 0, 0
for i = 4, #KEYS do
    local limit = tonumber(ARGV[2 * i - 2])
    local count = tonumber(redis.call('get', KEYS[i]) or '0') + 1
    if count == limit + 1 then
        first_over = 1
    end
    if count > limit then
        over = 1
    end
end
local queued = over == 0 or first_over == 1
local seq = 0
if queued then
    seq = tonumber(redis.call('get', KEYS[2]) or '0') + 1
    redis.call('xadd', KEYS[3], '*', 'message', ARGV[4], 'seq', seq, 'over', first_over)
end
redis.call('set', KEYS[1], '1', 'px', ARGV[1])
for i = 4, #KEYS do
    if redis.call('incr', KEYS[i]) == 1 then
        redis.call('pexpire', KEYS[i], ARGV[2 * i - 1])
    end
end
if queued then
    if redis.call('incr', KEYS[2]) == 1 then
        redis.call('pexpire', KEYS[2], ARGV[2])
    end
    redis.call('del', ARGV[3] .. seq)
end
return {seq, first_over}
"""

_SERVER_KEYS = ("host", "port", "db", "path", "username")


def _same_server(one: Redis, other: Redis) -> bool:
    first, second = one.connection_pool.connection_kwargs, other.connection_pool.connection_kwargs
    return all(first.get(key) == second.get(key) for key in _SERVER_KEYS)


def _text(value: bytes | str) -> str:
    # A caller-supplied client may not decode responses.
    return value.decode() if isinstance(value, bytes) else value


def _field(fields: dict[Any, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        value = fields.get(name.encode())
    return None if value is None else _text(value)


@contextlib.contextmanager
def _mapped(action: str) -> Iterator[None]:
    """Turn redis-py errors raised by ``action`` into kefu's store errors."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
        raise StoreError(f"redis unreachable during {action}: {exc}") from exc
    except redis_errors.RedisError as exc:
        raise StoreError(f"redis {action} failed: {exc}") from exc


def _no_group(exc: redis_errors.ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


class RedisInbox(Inbox):
    """The durable inbox of a multi-process deployment.

    Build it from ``url`` (the inbox owns and closes the connection pool) or from ``client`` (the caller
    owns it). ``maxlen`` bounds the unfinished entries: beyond it ``put`` raises StoreError, so the
    gateway answers with an error and the platform retries later. The stream is never trimmed, since
    trimming would drop accepted messages. ``dead_maxlen`` keeps roughly the newest dead letters.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        client: Redis | None = None,
        stream: str = "kefu:inbox",
        group: str = "workers",
        dead_stream: str = "kefu:inbox:dead",
        maxlen: int | None = None,
        dead_maxlen: int = 10_000,
        health_check_interval: int = 30,
        retries: int = 3,
        socket_timeout: float = 5.0,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigError("RedisInbox needs exactly one of url= or client=")
        self.stream = stream
        self.group = group
        self.dead_stream = dead_stream
        self._maxlen = maxlen
        self._dead_maxlen = dead_maxlen
        self._socket_timeout = socket_timeout
        self._owns_client = client is None
        if client is None:
            assert url is not None
            client = connect(
                url,
                health_check_interval=health_check_interval,
                retries=retries,
                socket_timeout=socket_timeout,
            )
        self.client = client
        self._touch = client.register_script(_TOUCH_SCRIPT)
        self._admit = client.register_script(_ADMIT_AND_PUT_SCRIPT)
        # Messages come from many concurrent webhook requests: their XADDs share round trips.
        self._pipeliner = Pipeliner(client)
        self._group_ready = False

    async def _ensure_group(self) -> None:
        # From id 0, not "$": entries put before the group existed (after a Redis restart the first
        # XADD recreates the stream without a group) must still be delivered.
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.group, self.stream)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _grouped(self, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """``await call(*args, **kwargs)`` with the consumer group in place, recreated if it vanished."""
        if not self._group_ready:
            await self._ensure_group()
        try:
            return await call(*args, **kwargs)
        except redis_errors.ResponseError as exc:
            if not _no_group(exc):
                raise
            log.warning("consumer group %s on %s vanished; creating it again", self.group, self.stream)
            await self._ensure_group()
            return await call(*args, **kwargs)

    async def put(self, message: InboundMessage) -> str:
        """Store ``message`` durably; returns its entry id. Raises StoreError when it cannot."""
        with _mapped("XADD"):
            if self._maxlen is not None and await self.client.xlen(self.stream) >= self._maxlen:
                raise StoreError(f"inbox {self.stream} is full ({self._maxlen} unfinished entries)")
            entry_id = await self._pipeliner.execute(
                "XADD", self.stream, "*", "message", message.model_dump_json()
            )
        return _text(entry_id)

    def admit_and_put(self, store: StateStore) -> AdmitAndPut | None:
        """One script for the intake: dedupe mark, rate counters, sequence number and XADD, when
        ``store`` is a :class:`RedisStore` on this inbox's server."""
        if not isinstance(store, RedisStore) or not _same_server(self.client, store.client):
            return None
        return functools.partial(self._admit_and_put, store)

    async def _admit_and_put(
        self, store: RedisStore, message: InboundMessage, request: AdmissionRequest
    ) -> Admission | None:
        keys = [
            store.key(request.mark),
            store.key(request.sequence),
            self.stream,
            *store.counter_keys(request),
        ]
        args: list[str | int] = [
            milliseconds(request.mark_ttl),
            milliseconds(request.sequence_ttl),
            store.key(request.clear_prefix),
            message.model_dump_json(),
            self._maxlen or 0,
            *counter_args(request),
        ]
        with _mapped("admission"):
            result = await self._pipeliner.run_script(self._admit, keys, args)
        if result is not None and int(result[0]) < 0:
            raise StoreError(f"inbox {self.stream} is full ({self._maxlen} unfinished entries)")
        return admission_of(result)

    async def claim(self, consumer: str, *, count: int = 16, block: float = 1.0) -> list[InboxEntry]:
        """Up to ``count`` new entries for ``consumer``, waiting up to ``block`` seconds for one."""
        # A block longer than the socket timeout would look like a dead connection.
        block_ms = max(1, int(min(block, self._socket_timeout / 2) * 1000))

        with _mapped("XREADGROUP"):
            response = await self._grouped(
                self.client.xreadgroup, self.group, consumer, {self.stream: ">"}, count=count, block=block_ms
            )
        entries: list[InboxEntry] = []
        for _stream, items in response or []:
            for entry_id, fields in items:
                entry = await self._entry(_text(entry_id), fields, deliveries=1)
                if entry is not None:
                    entries.append(entry)
        return entries

    async def ack(self, entry_id: str) -> None:
        """The entry is done (answered or dead-lettered): it is never delivered again."""

        async def ack_and_delete() -> Any:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, self.group, entry_id)
                pipe.xdel(self.stream, entry_id)
                return await pipe.execute()

        with _mapped("XACK"):
            await self._grouped(ack_and_delete)

    async def reclaim(self, consumer: str, *, min_idle: float, count: int = 16) -> list[InboxEntry]:
        """Entries claimed (by anyone) and not acknowledged for ``min_idle`` seconds, now ``consumer``'s."""
        min_idle_ms = max(0, int(min_idle * 1000))
        claimed: list[tuple[str, Any]] = []
        cursor = "0-0"
        with _mapped("XAUTOCLAIM"):
            # XAUTOCLAIM scans a bounded slice of the pending list per call; follow the cursor a few
            # times so a long list of busy entries does not hide the idle ones behind it.
            for _ in range(8):
                response = await self._grouped(
                    self.client.xautoclaim,
                    self.stream,
                    self.group,
                    consumer,
                    min_idle_ms,
                    cursor,
                    count=count - len(claimed),
                )
                cursor = _text(response[0])
                for entry_id, fields in response[1]:
                    if fields is None:  # deleted while pending (Redis 6.2 reports these here)
                        await self.client.xack(self.stream, self.group, entry_id)
                        continue
                    claimed.append((_text(entry_id), fields))
                if cursor == "0-0" or len(claimed) >= count:
                    break
            if not claimed:
                return []
            async with self.client.pipeline(transaction=False) as pipe:
                for entry_id, _fields in claimed:
                    pipe.xpending_range(self.stream, self.group, entry_id, entry_id, 1)
                pending = await pipe.execute()
        entries: list[InboxEntry] = []
        for (entry_id, fields), rows in zip(claimed, pending, strict=True):
            deliveries = int(rows[0]["times_delivered"]) if rows else 1
            entry = await self._entry(entry_id, fields, deliveries=deliveries)
            if entry is not None:
                entries.append(entry)
        return entries

    async def touch(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of entries ``consumer`` still holds, so nobody reclaims them."""
        if not entry_ids:
            return

        with _mapped("XCLAIM"):
            taken = await self._grouped(
                self._touch, keys=[self.stream, self.group], args=[consumer, *entry_ids]
            )
        if taken:
            # The sent records keep the customer from a second answer; this only says a process stalled.
            log.warning(
                "entries %s were reclaimed by another worker while still held", [_text(t) for t in taken]
            )

    async def dead_letter(self, entry: InboxEntry, reason: str) -> None:
        """Move an entry that keeps failing out of the queue, keeping it for operators."""

        async def move() -> Any:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    self.dead_stream,
                    {
                        "entry_id": entry.entry_id,
                        "message": entry.message.model_dump_json(),
                        "reason": reason,
                    },
                    maxlen=self._dead_maxlen,
                    approximate=True,
                )
                pipe.xack(self.stream, self.group, entry.entry_id)
                pipe.xdel(self.stream, entry.entry_id)
                return await pipe.execute()

        with _mapped("dead-letter XADD"):
            await self._grouped(move)

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters, oldest first."""
        with _mapped("XREVRANGE"):
            rows: list[Any] = await self.client.xrevrange(self.dead_stream, count=limit) or []
        letters: list[DeadLetter] = []
        for row_id, fields in reversed(rows):
            raw = _field(fields or {}, "message")
            if raw is None:
                continue
            letters.append(
                DeadLetter(
                    entry_id=_field(fields, "entry_id") or _text(row_id),
                    message=InboundMessage.model_validate_json(raw),
                    reason=_field(fields, "reason") or "",
                )
            )
        return letters

    async def depth(self) -> int:
        """Entries not yet acknowledged (waiting or being processed): acknowledged ones are deleted."""
        with _mapped("XLEN"):
            return int(await self.client.xlen(self.stream))

    async def aclose(self) -> None:
        """Close the connection pool, if this inbox opened it."""
        await self._pipeliner.aclose()
        if self._owns_client:
            await self.client.aclose(close_connection_pool=True)

    async def _entry(self, entry_id: str, fields: Any, *, deliveries: int) -> InboxEntry | None:
        """Decode a stream entry; one that cannot be read is dead-lettered instead of looping forever."""
        raw = _field(fields or {}, "message")
        try:
            if raw is None:
                raise ValueError("entry has no message field")
            message = InboundMessage.model_validate_json(raw)
            seq = _field(fields, "seq")
            if seq is not None:  # queued by admit_and_put: the intake's fields come beside the message
                extras = {**message.extras, SEQ_FIELD: int(seq)}
                if _field(fields, "over") == "1":
                    extras[NOTICE_FIELD] = RATE_NOTICE
                message = message.model_copy(update={"extras": extras})
        except ValueError:
            log.error("unreadable inbox entry %s dropped", entry_id, exc_info=True)
            # Keep the raw text for operators; the entry itself can never be answered.
            with _mapped("XADD"):
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.xadd(
                        self.dead_stream,
                        {"entry_id": entry_id, "raw": raw or "", "reason": "unreadable entry"},
                        maxlen=self._dead_maxlen,
                        approximate=True,
                    )
                    pipe.xack(self.stream, self.group, entry_id)
                    pipe.xdel(self.stream, entry_id)
                    await pipe.execute()
            return None
        return InboxEntry(entry_id=entry_id, message=message, deliveries=deliveries)
