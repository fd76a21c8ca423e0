"""Order tools over the ``orders`` table (demo business data; point them at a real backend instead)."""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any

from pydantic import Field
from sqlmodel import select

from core.db.models import CustomerIdentity, Order
from tools.context import ToolContext
from tools.registry import ToolRegistry

_ORDER_ID = re.compile(r"^[A-Za-z0-9-]{4,64}$")


async def query_order_status(
    ctx: ToolContext,
    order_id: Annotated[
        str,
        Field(
            min_length=1, max_length=80, description="The order number the customer gave, e.g. KF20251103001"
        ),
    ],
) -> dict[str, Any]:
    """Look up an order's status, carrier, tracking number and estimated delivery date.
    根据订单号查询订单状态、承运商、物流单号和预计送达时间。"""
    # Customers type order numbers in full-width digits, with spaces or in lower case.
    order_id = "".join(unicodedata.normalize("NFKC", order_id).split()).upper()
    if not _ORDER_ID.match(order_id):
        return {
            "found": False,
            "order_id": order_id[:64],
            "reason": "not a valid order number: ask the customer to check it (letters and digits only)",
        }
    async with ctx.db.session() as session:
        order = await session.get(Order, order_id)
        if order is None:
            return _not_found(order_id)
        identity = (
            await session.exec(
                select(CustomerIdentity).where(
                    CustomerIdentity.channel == ctx.key.channel,
                    CustomerIdentity.platform_user_id == ctx.user_id,
                )
            )
        ).first()
    # An order of another customer is reported as not found: the model must never reveal it.
    if identity is not None and order.customer_id not in (None, identity.customer_id):
        return _not_found(order_id)
    eta = order.eta.isoformat() if order.eta else None
    shipping = " ".join(part for part in (order.carrier, order.tracking_number) if part)
    return {
        "found": True,
        "order_id": order.id,
        "status": order.status,
        "carrier": order.carrier,
        "tracking_number": order.tracking_number,
        "eta": eta,
        # Key facts stay in the conversation's memory after the tool result leaves the window.
        "pinned": {
            f"order {order.id}": ", ".join(
                p for p in (order.status, shipping, f"ETA {eta}" if eta else "") if p
            )
        },
    }


def _not_found(order_id: str) -> dict[str, Any]:
    # The same answer for "no such order" and "someone else's order": nothing to probe with.
    return {
        "found": False,
        "order_id": order_id,
        "reason": "no order with this number for this customer: ask them to check the number",
    }


def register(registry: ToolRegistry) -> None:
    registry.tool(query_order_status, timeout=5.0)
