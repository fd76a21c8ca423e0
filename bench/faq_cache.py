"""FAQ fast paths: the cache-hit lookup and the model-down fallback, p50/p99 in milliseconds.

    python bench/faq_cache.py                 # cache on MemoryStore and Redis, fallback lexical + dense
    python bench/faq_cache.py --no-embedder   # skip the dense embedder (slow to load on a small CPU)

The cache is filled with the demo FAQ (``core.demo``); lookups are customer variants of its questions
(traditional characters, full-width letters, punctuation). Redis is 127.0.0.1:6379 (skipped if down).
The fallback runs the same retrieval the engine uses when the model is down, in a worker thread.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.db.models import FaqEntry
from core.demo import FAQ_EN, FAQ_ZH
from core.faq.cache import FaqCache
from core.faq.fallback import FaqFallback
from core.faq.normalize import normalize_question, to_simplified
from core.faq.retriever import DEFAULT_EMBEDDER
from core.faq.service import RetrieverHolder
from core.stores.base import StateStore
from core.stores.memory import MemoryStore

REDIS_URL = "redis://127.0.0.1:6379/0"


def demo_entries() -> list[FaqEntry]:
    entries = []
    for language, faqs in (("zh", FAQ_ZH), ("en", FAQ_EN)):
        for faq in faqs:
            entries.append(
                FaqEntry(
                    id=len(entries) + 1,
                    question=faq.question,
                    alternatives=list(faq.alternatives),
                    answer=faq.answer,
                    language=language,
                )
            )
    return entries


def variants(entries: Sequence[FaqEntry]) -> list[tuple[str, str]]:
    """Ways customers type the FAQ questions: they all normalise to a cached phrasing."""
    out: list[tuple[str, str]] = []
    for e in entries:
        for phrase in (e.question, *e.alternatives):
            out.append((phrase.rstrip("？?") + "呢？", e.language) if e.language == "zh" else (phrase, "en"))
            out.append((phrase.upper().replace("?", "？"), e.language))
    return out


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(fn: Callable[[], Awaitable[object]], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def report(label: str, samples: list[float]) -> None:
    print(
        f"{label:<34} n={len(samples):>5}  p50={statistics.median(samples):8.3f} ms  "
        f"p99={pct(samples, 0.99):8.3f} ms  max={max(samples):8.3f} ms"
    )


async def bench_cache(store: StateStore, label: str, entries: list[FaqEntry], rounds: int) -> None:
    cache = FaqCache(store=store, prefix=f"bench-faq:{uuid.uuid4().hex[:8]}:")
    start = time.perf_counter()
    keys = await cache.rebuild(entries)
    print(
        f"{label}: rebuild of {len(entries)} entries / {keys} phrasings: "
        f"{(time.perf_counter() - start) * 1000:.1f} ms"
    )
    asked = variants(entries)
    hits = 0

    async def one_pass() -> None:
        nonlocal hits
        for text, language in asked:
            hits += (await cache.lookup(text, language)) is not None

    await one_pass()  # warm-up (normalisation caches, connection pool)
    assert hits == len(asked), f"only {hits} of {len(asked)} variants hit"
    hit_samples: list[float] = []
    miss_samples: list[float] = []
    for text, language in (asked * (rounds // len(asked) + 1))[:rounds]:
        for asked_text, samples in ((text, hit_samples), (text + "，周末营业吗", miss_samples)):
            # Every customer types differently: no help from the normaliser's LRU caches.
            normalize_question.cache_clear()
            to_simplified.cache_clear()
            t0 = time.perf_counter()
            await cache.lookup(asked_text, language)
            samples.append((time.perf_counter() - t0) * 1000)
    report(f"cache hit ({label})", hit_samples)
    report(f"cache miss ({label})", miss_samples)
    await cache.wait_idle()
    await cache.clear()


async def bench_fallback(entries: list[FaqEntry], *, dense: bool, rounds: int) -> None:
    holder = RetrieverHolder(embedder=DEFAULT_EMBEDDER if dense else None)
    start = time.perf_counter()
    await holder.rebuild(entries)
    label = "dense+BM25" if holder.retriever and holder.retriever.uses_embedder else "BM25 only"
    print(f"fallback index ({label}): built in {(time.perf_counter() - start) * 1000:.0f} ms")
    fallback = FaqFallback(retriever_holder=holder)
    # Distinct texts only: the embedder caches vectors per text, a repeat would cost nothing.
    queries = list(dict.fromkeys((q.lower(), lang) for q, lang in variants(entries)))[:rounds]
    await fallback.answer("warm-up 预热", "zh")  # first call pays for thread pool and model pages
    answered = 0
    samples: list[float] = []
    for text, language in queries:
        t0 = time.perf_counter()
        result = await fallback.answer(text, language)  # type: ignore[arg-type]
        samples.append((time.perf_counter() - t0) * 1000)
        answered += result.kind == "faq"
    report(f"fallback answer ({label})", samples)
    print(f"  answered from the FAQ: {answered}/{len(samples)} (all are FAQ phrasings)")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--fallback-rounds", type=int, default=300)
    parser.add_argument("--no-embedder", action="store_true")
    args = parser.parse_args()
    entries = demo_entries()

    async with MemoryStore() as memory:
        await bench_cache(memory, "MemoryStore", entries, args.rounds)
    try:
        from core.stores.redis import RedisStore

        async with RedisStore(url=REDIS_URL, prefix="kefu-bench:") as redis_store:
            if await redis_store.ping():
                await bench_cache(redis_store, "Redis 127.0.0.1:6379", entries, args.rounds)
            else:
                print("Redis at 127.0.0.1:6379 is not answering: skipped")
    except Exception as exc:  # a benchmark reports and goes on
        print(f"Redis benchmark failed: {exc}")

    await bench_fallback(entries, dense=False, rounds=args.fallback_rounds)
    if not args.no_embedder:
        await bench_fallback(entries, dense=True, rounds=args.fallback_rounds)


if __name__ == "__main__":
    asyncio.run(main())
