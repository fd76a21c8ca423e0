"""Lets the model pin a fact the rules did not catch (a preferred delivery time, a product model)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from tools.context import ToolContext
from tools.registry import ToolRegistry


async def remember_fact(
    ctx: ToolContext,
    label: Annotated[str, Field(min_length=1, max_length=40, description="Short name of the fact")],
    value: Annotated[str, Field(min_length=1, max_length=120, description="The fact itself")],
) -> dict[str, Any]:
    """Pin an important fact the customer stated so it stays known for the rest of the conversation.
    记住客户提供的重要信息（如期望送货时间、商品型号），在整个对话中保留。"""
    return {"ok": True, "pinned": {label: value}}


def register(registry: ToolRegistry) -> None:
    registry.tool(remember_fact, timeout=2.0)
