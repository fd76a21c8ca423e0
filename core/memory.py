"""Pinned facts ("[MEMORY]"): what the customer told us that must never be forgotten.

Order numbers, ticket ids, phone numbers, e-mail addresses, names and addresses are extracted from each
customer message by rules; business tools add key facts from their results (an order's status); the
model may add others through the ``remember_fact`` tool. Facts live on the conversation row, are always
in the prompt, and survive summarisation because they never pass through the summariser.

A later statement replaces an earlier one for single-valued kinds (phone, e-mail, name, address). Order
numbers and ticket ids are lists (a customer may ask about several); a correction ("不是X，是Y",
"sorry, it's Y", "写错了") replaces the most recent one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MAX_LIST = 5
MAX_VALUE_CHARS = 120
MAX_NOTES = 10

# Order numbers: letters followed by many digits (KF20251103001, JD123456789), or what follows the
# word "order"/"订单".
_ORDER_CODE = re.compile(r"(?<![A-Za-z0-9])([A-Za-z]{1,4}-?\d{6,20})(?![A-Za-z0-9])")
_ORDER_AFTER_WORD = re.compile(
    r"(?:订单号?|单号|order\s*(?:number|no\.?|#|id)?)\s*(?:是|为|:|：|#)?\s*([A-Za-z0-9-]{6,32})",
    re.IGNORECASE,
)
_TICKET = re.compile(
    r"(?:工单号?|ticket\s*(?:number|no\.?|#|id)?)\s*(?:是|为|:|：|#)?\s*([A-Za-z]*-?\d{1,12})", re.I
)
_PHONE = re.compile(
    r"(?<!\d)(?:\+?86[- ]?)?(1[3-9]\d[- ]?\d{4}[- ]?\d{4})(?!\d)|(\+\d{1,3}[- ]?\d[\d -]{6,14}\d)"
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_NAME = re.compile(
    r"(?:我叫|我的名字是|我的名字叫|本人)\s*"
    r"([\u4e00-\u9fa5]{2,4}|[A-Za-z][A-Za-z .'-]{1,40}?)(?=[，,。.!！\s]|$)"
    r"|(?:my name is|this is|i am|i'm)\s+([A-Z][a-z]+(?:\s+[A-Z][a-z]+){0,2})",
)
_ADDRESS = re.compile(
    r"(?:收货地址|地址|寄到|送到)\s*(?:是|为|改成|改为|:|：)?\s*([^\s，,。；;]{6,120})"
    r"|(?:my (?:new )?address is|ship (?:it )?to|deliver (?:it )?to)\s*:?\s*([^\n;]{6,120})",
    re.IGNORECASE,
)
_CORRECTION = re.compile(r"不是|写错|打错|更正|改成|改为|sorry|correction|i meant|actually|wrong", re.I)
_NOT_ORDER = re.compile(r"^\d{6,}$")
_NEGATED = re.compile(
    r"(?:不是|并非|而非|not|instead of)\s*(?:订单号?|order)?\s*#?\s*([A-Za-z0-9-]{4,32})", re.I
)


LABELS: dict[str, str] = {
    "order_ids": "order number / 订单号",
    "ticket_ids": "ticket / 工单号",
    "name": "name / 姓名",
    "phone": "phone / 电话",
    "email": "e-mail / 邮箱",
    "address": "address / 地址",
}
_ORDER = ("order_ids", "ticket_ids", "name", "phone", "email", "address")


def _clean(value: str) -> str:
    value = re.sub(r"\s+", " ", value).strip(" ，,。.；;:：")
    return value[:MAX_VALUE_CHARS]


def _add_to_list(
    facts: dict[str, Any], kind: str, values: list[str], *, correction: bool, negated: set[str]
) -> None:
    current: list[str] = list(facts.get(kind, []))
    if negated & set(current):
        # "KF2, not KF1": the negated value is the one being corrected.
        current = [v for v in current if v not in negated]
        correction = False
    for value in values:
        if value in negated:
            continue
        if value in current:
            current.remove(value)
        elif correction and current:
            current.pop()
        current.append(value)
    facts[kind] = current[-MAX_LIST:]


def extract_facts(text: str, pinned: Mapping[str, Any]) -> dict[str, Any]:
    """The pinned facts after reading one customer message (a new dict; ``pinned`` is not changed)."""
    facts: dict[str, Any] = {
        k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
        for k, v in pinned.items()
    }
    correction = bool(_CORRECTION.search(text))
    negated = {m.upper() for m in _NEGATED.findall(text)}

    tickets = [m.upper() for m in _TICKET.findall(text)]
    orders: list[str] = []
    for match in [*_ORDER_AFTER_WORD.findall(text), *_ORDER_CODE.findall(text)]:
        value = match.upper()
        digits = sum(ch.isdigit() for ch in value)
        if value in tickets or digits < 6 or value in orders:
            continue
        if _NOT_ORDER.match(value) and _PHONE.fullmatch(value):
            continue
        orders.append(value)
    phones = ["".join(ch for ch in (a or b) if ch.isdigit() or ch == "+") for a, b in _PHONE.findall(text)]
    orders = [o for o in orders if o not in {p.lstrip("+") for p in phones}]
    if orders:
        _add_to_list(facts, "order_ids", orders, correction=correction, negated=negated)
    if tickets:
        _add_to_list(facts, "ticket_ids", tickets, correction=correction, negated=negated)
    if phones:
        facts["phone"] = phones[-1]
    emails = _EMAIL.findall(text)
    if emails:
        facts["email"] = emails[-1]
    for zh_name, en_name in _NAME.findall(text):
        name = _clean(zh_name or en_name)
        if name:
            facts["name"] = name
    for zh_addr, en_addr in _ADDRESS.findall(text):
        address = _clean(zh_addr or en_addr)
        if address and not _EMAIL.fullmatch(address):
            facts["address"] = address
    return facts


def add_note(pinned: Mapping[str, Any], label: str, value: str) -> dict[str, Any]:
    """A fact from a tool result or the model (``notes`` keep the latest value per label)."""
    facts = dict(pinned)
    notes = dict(facts.get("notes", {}))
    label = _clean(label)[:40]
    notes.pop(label, None)
    notes[label] = _clean(value)
    while len(notes) > MAX_NOTES:
        notes.pop(next(iter(notes)))
    facts["notes"] = notes
    return facts


def render_memory(pinned: Mapping[str, Any]) -> str:
    """The [MEMORY] block for the prompt, in a fixed order so the text is stable between turns."""
    lines: list[str] = []
    for kind in _ORDER:
        value = pinned.get(kind)
        if not value:
            continue
        shown = ", ".join(value) if isinstance(value, list) else str(value)
        lines.append(f"- {LABELS[kind]}: {shown}")
    for label, value in dict(pinned.get("notes", {})).items():
        lines.append(f"- {label}: {value}")
    if not lines:
        return ""
    return "[MEMORY] Facts from this conversation / 本次对话中的关键信息:\n" + "\n".join(lines)
