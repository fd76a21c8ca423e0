"""FAQ answer cache on both stores: normalised hits, atomic rebuilds, hit counts, refresh from the table."""

from __future__ import annotations

import pytest

from core.db.database import Database
from core.db.models import FaqEntry
from core.faq.cache import FaqCache
from core.faq.repository import FaqRepository
from core.faq.service import FaqService, RetrieverHolder, refresh_faq_cache, sync_faq
from core.stores.base import StateStore
from core.stores.redis import RedisStore
from tests.core.conftest import REDIS_URL, drop_keys, unique_prefix


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def entry(entry_id: int, question: str, answer: str, *alternatives: str, language: str = "zh") -> FaqEntry:
    return FaqEntry(
        id=entry_id, question=question, answer=answer, alternatives=list(alternatives), language=language
    )


ENTRIES = [
    entry(1, "怎么申请退款？", "在订单页点击申请退款。", "我要退货退款"),
    entry(2, "How do I reset my password?", "Use 'Forgot password'.", "I forgot my password", language="en"),
    entry(3, "支持货到付款吗？", "暂不支持货到付款。"),
]


@pytest.mark.parametrize(
    ("asked", "language", "expected"),
    [
        ("怎么申请退款？", "zh", 1),
        ("怎麼申請退款?", "zh", 1),  # traditional characters, half-width punctuation
        ("怎么申请退款呢！！", "zh", 1),  # trailing particle and punctuation
        ("  怎么 申请 退款 ", "zh", 1),  # spacing
        ("我要退货退款。", "zh", 1),  # an alternative phrasing
        ("ＨＯＷ DO I RESET MY PASSWORD", "en", 2),  # full width and upper case
        ("i forgot my password!!!", "en", 2),
        ("how do i reset my password", "zh", None),  # the entry is English
        ("怎么申请退款才能最快到账", "zh", None),  # a different question is not an exact match
    ],
)
async def test_lookup_hits_after_normalisation(
    store: StateStore, asked: str, language: str, expected: int | None
) -> None:
    cache = FaqCache(store=store)
    await cache.rebuild(ENTRIES)
    hit = await cache.lookup(asked, language)
    assert (hit.entry_id if hit else None) == expected
    if hit is not None:
        assert hit.answer == next(e.answer for e in ENTRIES if e.id == expected)
    await cache.wait_idle()


async def test_rebuild_swaps_atomically_and_old_answers_disappear_everywhere(store: StateStore) -> None:
    clock = Clock()
    writer = FaqCache(store=store, clock=clock)
    reader = FaqCache(store=store, clock=clock, generation_ttl=5.0)  # another process
    await writer.rebuild(ENTRIES)
    assert (await reader.lookup("怎么申请退款", "zh")) is not None

    edited = [
        entry(1, "如何办理退款？", "请在「我的订单」中申请售后。"),
        *ENTRIES[1:],
    ]
    await writer.rebuild(edited)
    # The reader still remembers the old generation, but its answers are gone: no stale answer, and
    # no miss either — a miss makes it look for a newer generation, so nothing waits for its TTL.
    assert await reader.lookup("怎么申请退款", "zh") is None
    assert await reader.lookup("我要退货退款", "zh") is None
    hit = await reader.lookup("如何办理退款", "zh")
    assert hit is not None and hit.answer == "请在「我的订单」中申请售后。"
    assert (await reader.lookup("支持货到付款吗", "zh")) is not None  # unchanged entries stay hits
    assert (await writer.lookup("支持货到付款吗", "zh")) is not None
    for cache in (writer, reader):
        await cache.wait_idle()


async def test_old_generation_keys_are_deleted_from_redis() -> None:
    prefix = unique_prefix()
    redis_store = RedisStore(url=REDIS_URL, prefix=prefix)
    try:
        cache = FaqCache(store=redis_store)
        await cache.rebuild(ENTRIES)
        old = await cache.generation()
        assert old is not None
        await cache.rebuild(ENTRIES[:1])
        keys = {k async for k in redis_store.client.scan_iter(match=f"{prefix}*")}
        # 1 question + 1 alternative, manifest, gen, meta; nothing of the first generation survives.
        assert len(keys) == 5
        assert not [k for k in keys if old in k]
        for key in keys:  # everything expires eventually, even if no rebuild ever runs again
            assert await redis_store.client.pttl(key) > 0
    finally:
        await drop_keys(redis_store.client, prefix)
        await redis_store.aclose()


async def test_disabled_entries_are_not_served(store: StateStore) -> None:
    cache = FaqCache(store=store)
    disabled = entry(4, "可以分期付款吗？", "支持花呗分期。")
    disabled.enabled = False
    await cache.rebuild([*ENTRIES, disabled])
    assert await cache.lookup("可以分期付款吗", "zh") is None


async def test_hits_are_counted_per_entry(store: StateStore) -> None:
    cache = FaqCache(store=store)
    await cache.rebuild(ENTRIES)
    for asked in ("怎么申请退款", "我要退货退款", "怎麼申請退款", "I forgot my password"):
        await cache.lookup(asked, "en" if asked.startswith("I") else "zh")
    await cache.lookup("怎么申请退款", "zh", count=False)
    await cache.wait_idle()
    assert await cache.hit_counts([1, 2, 3]) == {1: 3, 2: 1, 3: 0}


async def test_refresh_and_service_keep_cache_and_index_in_step(
    store: StateStore, database: Database
) -> None:
    holder = RetrieverHolder(embedder=None)
    service = FaqService(db=database, store=store, retriever_holder=holder)
    added = await service.add(question="发什么快递？", answer="默认顺丰。", alternatives=["用的什么快递"])
    cache = FaqCache(store=store, generation_ttl=0)
    assert (await cache.lookup("用的什么快递？", "zh")) is not None
    assert holder.retriever is not None and holder.retriever.best("发的什么快递呀") is not None

    assert added.id is not None
    await service.update(added.id, answer="默认京东物流。")
    hit = await cache.lookup("发什么快递", "zh")
    assert hit is not None and hit.answer == "默认京东物流。"
    await service.delete(added.id)
    assert await cache.lookup("发什么快递", "zh") is None
    assert holder.retriever is not None and holder.retriever.best("发什么快递") is None
    await cache.wait_idle()


async def test_sync_notices_changes_made_by_another_process(store: StateStore, database: Database) -> None:
    holder = RetrieverHolder(embedder=None)
    repo = FaqRepository(db=database)  # e.g. `kefu faq import` in another process
    await repo.add(question="支持货到付款吗？", answer="暂不支持。")
    assert await refresh_faq_cache(db=database, store=store, retriever_holder=holder) == 1
    assert not await sync_faq(db=database, store=store, retriever_holder=holder)

    await repo.add(question="可以开发票吗？", answer="可以。")
    assert await sync_faq(db=database, store=store, retriever_holder=holder)
    assert (await FaqCache(store=store).lookup("可以开发票吗", "zh")) is not None
    assert holder.retriever is not None and holder.retriever.best("能开发票吗") is not None
    assert not await sync_faq(db=database, store=store, retriever_holder=holder)
