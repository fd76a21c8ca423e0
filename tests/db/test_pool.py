"""A busy process keeps its PostgreSQL connections: no connect (a forked server process, an
authentication) per turn once it has warmed up."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import event

from core.llm.testing import FunctionModel, echo
from core.messages import ConversationKey, InboundMessage
from core.runtime import Runtime
from core.settings import load_settings
from tests.db.conftest import _empty_pg_url

pytestmark = pytest.mark.postgres


async def test_concurrent_turns_reuse_the_pooled_connections(pg_database: str) -> None:
    settings = load_settings(
        _env_file=None,
        database_url=await _empty_pg_url(pg_database),
        redis_url=None,
        faq_embeddings=False,
        scheduler_enabled=False,
        worker_concurrency=8,
    )
    async with Runtime.open(settings, model=FunctionModel(echo)) as runtime:
        opened: list[object] = []
        event.listen(runtime.db.engine.sync_engine, "connect", lambda *_: opened.append(1))

        async def turn(chat: int, n: int) -> None:
            key = ConversationKey(channel="telegram", chat_id=str(chat))
            message = InboundMessage(key=key, user_id=str(chat), message_id=f"m{n}", text=f"question {n}")
            reply = await runtime.engine.handle(message)
            assert reply.text

        # As many conversations at once as the worker has lanes, three rounds.
        await asyncio.gather(*(turn(chat, 0) for chat in range(8)))
        warmed_up = len(opened)
        for n in (1, 2):
            await asyncio.gather(*(turn(chat, n) for chat in range(8)))
    assert len(opened) == warmed_up
