"""Pinned facts: extracted from what customers say, corrected when they correct themselves."""

from __future__ import annotations

from typing import Any

import pytest

from core.memory import add_note, extract_facts, render_memory


def read(*messages: str) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for message in messages:
        facts = extract_facts(message, facts)
    return facts


@pytest.mark.parametrize(
    ("message", "kind", "value"),
    [
        ("你好，我的订单号是KF20251103001，怎么还没发货？", "order_ids", ["KF20251103001"]),
        ("order #JD123456789 hasn't arrived", "order_ids", ["JD123456789"]),
        ("订单 kf20251103001 到哪了", "order_ids", ["KF20251103001"]),
        ("工单号 TK-2042 有进展吗", "ticket_ids", ["TK-2042"]),
        ("我的手机是 138-1234-5678", "phone", "13812345678"),
        ("call me on +44 20 7946 0958", "phone", "+442079460958"),
        ("my email is li.lei@example.com", "email", "li.lei@example.com"),
        ("我叫张伟，想查个订单", "name", "张伟"),
        ("my name is John Smith", "name", "John Smith"),
        ("收货地址：北京市朝阳区建国路88号3单元", "address", "北京市朝阳区建国路88号3单元"),
        ("please ship it to 221B Baker Street, London", "address", "221B Baker Street, London"),
    ],
)
def test_structured_facts_are_pinned(message: str, kind: str, value: object) -> None:
    assert read(message)[kind] == value


def test_a_phone_number_is_not_mistaken_for_an_order() -> None:
    facts = read("手机号13812345678")
    assert facts.get("order_ids") is None and facts["phone"] == "13812345678"


def test_plain_numbers_are_not_pinned() -> None:
    assert read("I want 2 items for 100000 yuan") == {}


@pytest.mark.parametrize(
    "messages",
    [
        ("订单KF20251103001", "不是KF20251103001，是KF20251103009"),
        ("order KF20251103001", "sorry, the order is KF20251103009 not KF20251103001"),
        ("订单KF20251103001", "刚才写错了，应该是KF20251103009"),
    ],
)
def test_a_correction_replaces_the_order_number(messages: tuple[str, ...]) -> None:
    assert read(*messages)["order_ids"] == ["KF20251103009"]


def test_a_second_order_is_added_not_replaced() -> None:
    assert read("订单KF20251103001", "还有一个订单 KF20251103005")["order_ids"] == [
        "KF20251103001",
        "KF20251103005",
    ]


def test_later_contact_details_replace_earlier_ones() -> None:
    facts = read(
        "手机13812345678", "电话改成 13912345678", "my email is a@example.com", "email: b@example.com"
    )
    assert facts["phone"] == "13912345678"
    assert facts["email"] == "b@example.com"


def test_memory_block_is_stable_and_complete() -> None:
    facts = add_note(read("订单KF20251103001 手机13812345678"), "order KF20251103001", "shipped, SF SF123")
    block = render_memory(facts)
    assert block == render_memory(dict(reversed(list(facts.items()))))
    assert "KF20251103001" in block and "13812345678" in block and "shipped, SF SF123" in block
    assert render_memory({}) == ""
