"""FAQ search for the model: the entries closest to the customer's question, with a confidence."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from pydantic import Field

from core.faq.repository import FaqRepository
from core.faq.service import RetrieverHolder
from tools.context import ToolContext
from tools.registry import ToolRegistry

__all__ = ["register"]

MAX_RESULTS = 3


def register(registry: ToolRegistry, *, faq_index: RetrieverHolder | None = None) -> None:
    """Register ``search_faq`` over ``faq_index`` (the process's shared index).

    Without one, the tool builds its own lexical index from the FAQ table on first use and rebuilds it
    when the table changes.
    """
    index = faq_index
    own = RetrieverHolder(embedder=None) if index is None else None

    async def search_faq(
        ctx: ToolContext,
        question: Annotated[
            str, Field(min_length=1, max_length=500, description="The customer's question, in their words")
        ],
    ) -> dict[str, Any]:
        """Search the shop's FAQ (shipping, returns, refunds, payment, invoices, membership...).
        Returns the closest entries with a confidence from 0 to 1; use an answer only if it fits.
        搜索常见问题库，返回最相关的问答及置信度。"""
        holder = index if index is not None else await _own_index(ctx, own)
        retriever = holder.retriever
        if retriever is None:
            return {"results": [], "note": "the FAQ is still loading"}
        hits = await asyncio.to_thread(retriever.search, question, k=MAX_RESULTS, language=ctx.language)
        if not hits:  # no entry in the customer's language: try every language
            hits = await asyncio.to_thread(retriever.search, question, k=MAX_RESULTS)
        results = []
        for hit in hits:
            doc = retriever.doc(hit.doc_id)
            results.append(
                {"question": doc.question, "answer": doc.answer, "confidence": round(hit.confidence, 2)}
            )
        return {
            "results": results,
            "note": f"answers below {retriever.threshold:g} confidence probably do not match",
        }

    registry.tool(search_faq, timeout=10.0)


async def _own_index(ctx: ToolContext, holder: RetrieverHolder | None) -> RetrieverHolder:
    assert holder is not None
    repository = FaqRepository(db=ctx.db)
    fingerprint = await repository.fingerprint()
    if holder.fingerprint != fingerprint or not holder.ready:
        await holder.rebuild(await repository.list(enabled_only=True), fingerprint=fingerprint)
    return holder
