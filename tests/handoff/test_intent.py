"""Customer requests for a person are recognised in Chinese and English; mere mentions are not."""

from __future__ import annotations

import pytest

from core.handoff_intent import wants_human

REQUESTS = [
    "人工",
    "转人工",
    "转人工！",
    "我要转人工",
    "请帮我转人工客服",
    "找客服",
    "人工客服",
    "真人",
    "我要找人工客服，谢谢",
    "能不能转接人工？",
    "human",
    "Human please",
    "agent",
    "talk to a human",
    "I want to speak to an agent",
    "can I speak to a real person?",
    "Connect me to a human",
    "please transfer me to an operator",
    "/human",
    "/human@kefu_test_bot",
]

NOT_REQUESTS = [
    "the human resources department",
    "Where is the human resources department?",
    "人工智能是什么",
    "人工费多少钱",
    "我要人工费的发票",
    "人工湖附近有门店吗",
    "is this answered by a human or a bot?",
    "I am a human",
    "the agent who delivered my parcel was rude",
    "human error in my order",
    "what does a travel agent do",
    "你是人工吗",
    "不用转人工了",
    "I don't want to talk to an agent",
    "hello",
    "我的订单到哪了",
    "/humanity",
    "",
]


@pytest.mark.parametrize("text", REQUESTS)
def test_requests_for_a_person_are_recognised(text: str) -> None:
    assert wants_human(text)


@pytest.mark.parametrize("text", NOT_REQUESTS)
def test_mentions_are_not_requests(text: str) -> None:
    assert not wants_human(text)


def test_telegram_human_command_counts_whatever_the_text() -> None:
    assert wants_human("", {"command": "human"})
    assert not wants_human("", {"command": "help"})


def test_a_long_question_mentioning_a_person_is_left_to_the_model() -> None:
    question = "My parcel was left outside and I want to talk to a human about the refund policy " * 2
    assert not wants_human(question)
