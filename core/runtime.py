"""Everything a kefu process needs, opened from settings and closed in reverse order.

Entry points (``kefu serve``, ``kefu chat``, ``kefu worker``) read the settings once and do::

    async with Runtime.open(settings) as runtime:
        reply = await runtime.engine.handle(message)

A failure while opening closes what was already opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from core import metrics
from core.audit import AuditLog
from core.breaker import CircuitBreaker
from core.context import ContextBudget, ContextBuilder
from core.conversations import ConversationStore
from core.crypto import keyring_from_settings
from core.db.database import Database
from core.db.migrate import upgrade_async
from core.engine import Engine, EngineLimits
from core.faq.cache import FaqCache
from core.faq.fallback import FaqFallback
from core.faq.retriever import DEFAULT_EMBEDDER
from core.faq.service import RetrieverHolder, watch_faq
from core.faq.vectors import VectorStore
from core.guards import InputGuard
from core.guards.output_guard import OutputModerator
from core.inbox.base import Inbox
from core.inbox.factory import build_inbox
from core.intake import Intake, RateLimits
from core.llm.base import ChatModel
from core.llm.bounded import BoundedModel
from core.llm.factory import EMBEDDED_MAX_CTX, build_model
from core.prompt import load_system_prompt
from core.settings import Settings
from core.stores.base import StateStore
from core.stores.factory import build_store
from core.summary import Summarizer
from tools import default_registry
from tools.registry import ToolRegistry

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    db: Database
    store: StateStore
    model: ChatModel
    tools: ToolRegistry
    conversations: ConversationStore
    engine: Engine
    inbox: Inbox
    intake: Intake
    audit: AuditLog
    faq_index: RetrieverHolder
    faq_cache: FaqCache
    faq_synced: asyncio.Event
    """Set once this process's first FAQ sync (cache and retrieval index) is over."""

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, *, model: ChatModel | None = None) -> AsyncIterator[Runtime]:
        """Open database, store and model; ``model`` replaces the configured backend (tests, benchmarks)."""
        async with AsyncExitStack() as stack:
            if settings.auto_migrate:
                await upgrade_async(settings.database_url)
            # Each of the worker's lanes holds a connection during a turn; the audit log, the hand-off
            # check and the FAQ watch use a few more. Connections beyond the pool are closed on return,
            # and PostgreSQL forks a process for every new one.
            db = await stack.enter_async_context(
                Database(url=settings.database_url, pool_size=settings.worker_concurrency + 4)
            )
            store = await stack.enter_async_context(build_store(redis_url=settings.redis_url))
            # Every model call of this process (answers and summaries) shares one bound.
            chat_model: ChatModel = BoundedModel(
                metrics.MeteredModel(await stack.enter_async_context(model or build_model(settings))),
                limit=settings.max_concurrent_model_calls,
            )
            keyring = await asyncio.to_thread(keyring_from_settings, settings)
            conversations = ConversationStore(db=db, keyring=keyring)
            audit = AuditLog(db=db, keyring=keyring)
            faq_index = RetrieverHolder(
                embedder=DEFAULT_EMBEDDER if settings.faq_embeddings else None, vectors=VectorStore(db=db)
            )
            faq_cache = FaqCache(store=store)
            faq_synced = asyncio.Event()
            watcher = asyncio.create_task(
                watch_faq(
                    db=db,
                    store=store,
                    retriever_holder=faq_index,
                    interval=settings.faq_refresh_seconds,
                    first_sync=faq_synced,
                ),
                name="faq-watch",
            )
            stack.push_async_callback(_cancel, watcher)
            tools = default_registry(faq_index=faq_index)
            guard = await asyncio.to_thread(InputGuard.load)
            system_prompt = load_system_prompt(settings.system_prompt_file)
            breaker = CircuitBreaker(
                failure_threshold=3, window=60.0, cooldown=30.0, probe_timeout=2 * settings.llm_timeout
            )
            metrics.track_breaker(breaker)
            num_ctx = settings.num_ctx
            if settings.llm_backend == "llamacpp":
                num_ctx = min(num_ctx, EMBEDDED_MAX_CTX)
            budget = ContextBudget(
                num_ctx=num_ctx,
                answer_tokens=settings.max_answer_tokens,
                history_turns=settings.history_turns,
                block_turns=settings.history_turns,
            )
            engine = Engine(
                conversations=conversations,
                store=store,
                model=chat_model,
                tools=tools,
                system_prompt=system_prompt,
                context=ContextBuilder(counter=chat_model.count_tokens, budget=budget),
                summarizer=Summarizer(
                    model=chat_model,
                    conversations=conversations,
                    counter=chat_model.count_tokens,
                    prompt_limit=budget.prompt_limit,
                    model_name=settings.summary_model,
                ),
                guard=guard,
                faq_cache=faq_cache,
                fallback=FaqFallback(retriever_holder=faq_index, threshold=settings.faq_min_confidence),
                breaker=breaker,
                audit=audit,
                moderator=await asyncio.to_thread(
                    OutputModerator.load,
                    system_prompt=system_prompt,
                    tool_texts=[
                        json.dumps(spec.openai_format(), ensure_ascii=False) for spec in tools.specs()
                    ],
                ),
                limits=EngineLimits(
                    max_input_chars=settings.max_input_chars,
                    max_tool_rounds=settings.max_tool_rounds,
                ),
            )
            inbox = await stack.enter_async_context(build_inbox(redis_url=settings.redis_url))
            intake = Intake(
                store=store,
                inbox=inbox,
                rate_limits=RateLimits(
                    per_user=settings.rate_limit_per_minute,
                    per_conversation=settings.conversation_rate_limit_per_minute,
                ),
            )
            try:
                yield cls(
                    settings=settings,
                    db=db,
                    store=store,
                    model=chat_model,
                    tools=tools,
                    conversations=conversations,
                    engine=engine,
                    inbox=inbox,
                    intake=intake,
                    audit=audit,
                    faq_index=faq_index,
                    faq_cache=faq_cache,
                    faq_synced=faq_synced,
                )
            finally:
                await engine.wait_idle()

    async def readiness(self) -> dict[str, bool]:
        """Which dependencies answer right now (for /readyz and ``kefu check``)."""
        checks: dict[str, bool] = {}
        try:
            checks["database"] = await self.db.ping()
        except Exception:
            log.warning("database not ready", exc_info=True)
            checks["database"] = False
        try:
            checks["store"] = await self.store.ping()
        except Exception:
            log.warning("store not ready", exc_info=True)
            checks["store"] = False
        try:
            checks["model"] = (await self.model.info()).reachable
        except Exception:
            log.warning("model not ready", exc_info=True)
            checks["model"] = False
        return checks


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
