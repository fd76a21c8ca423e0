"""One Telegram bot, several worker processes: together they keep the bot's overall send rate."""

from __future__ import annotations

import asyncio
import logging

import pytest

from core.errors import StoreError
from core.pacing import SharedRate
from core.stores.base import StateStore
from core.stores.memory import MemoryStore


async def send_times(rates: list[SharedRate], each: int) -> list[int]:
    """The second in which each of ``each`` sends per rate was let through."""
    seconds: list[int] = []

    async def sender(rate: SharedRate) -> None:
        for _ in range(each):
            seconds.append(await rate.wait())

    await asyncio.gather(*(sender(rate) for rate in rates))
    return seconds


async def test_two_workers_share_one_bots_limit(store: StateStore) -> None:
    # Two processes' senders of one bot, 10 sends a second allowed in all, 15 sends each.
    workers = [SharedRate(store=store, name="telegram:42", per_second=10) for _ in range(2)]
    seconds = await send_times(workers, each=15)
    # 30 sends at 10 a second need three seconds: alone, each worker would have needed two.
    assert max(seconds) - min(seconds) >= 2
    assert max(seconds.count(second) for second in set(seconds)) <= 10


class DownStore(MemoryStore):
    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        raise StoreError("redis is restarting")


async def test_sends_go_on_at_the_same_rate_while_the_store_is_down(caplog: pytest.LogCaptureFixture) -> None:
    rate = SharedRate(store=DownStore(), name="telegram:42", per_second=20)
    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.WARNING, logger="core.pacing"):
        started = loop.time()
        for _ in range(11):
            await rate.wait()
        spent = loop.time() - started
    # One warning for the outage, not one per message.
    assert caplog.text.count("pacing this process alone") == 1
    # Eleven sends at 20 a second, spaced evenly: the last one half a second after the first.
    assert spent >= 0.5
