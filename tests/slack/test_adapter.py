"""adapters.slack translation: which events become customer messages, and how replies look in Slack."""

from __future__ import annotations

import pytest

from adapters.slack import plain_text, render_mrkdwn, split_message, to_inbound
from core.messages import ConversationKey
from tests.slack.conftest import BOT_USER, DM, GENERAL, SUPPORT, event_callback, mention_event, message_event

SUPPORT_CHANNELS = frozenset({SUPPORT})


def test_dm_is_one_conversation_per_dm_and_its_id_dedupes_by_channel_and_ts() -> None:
    event = message_event("Hi, I need help", ts="1700000001.000100")
    message = to_inbound(event_callback(event), support_channels=SUPPORT_CHANNELS)
    assert message is not None
    assert message.key == ConversationKey(channel="slack", chat_id=DM, thread_id=None)
    assert message.message_id == f"{DM}:1700000001.000100"
    assert message.user_id == "UCUSTOMER"
    assert message.language == "en"
    threaded = to_inbound(
        event_callback(message_event("more", thread_ts="1700000001.000100")),
        support_channels=SUPPORT_CHANNELS,
    )
    assert threaded is not None and threaded.key.thread_id == "1700000001.000100"


def test_support_channel_top_level_and_thread_reply_share_the_thread_root() -> None:
    root = to_inbound(
        event_callback(message_event("broken", channel=SUPPORT, channel_type="channel", ts="1.000200")),
        support_channels=SUPPORT_CHANNELS,
    )
    reply = to_inbound(
        event_callback(
            message_event(
                "still broken", channel=SUPPORT, channel_type="channel", ts="1.000300", thread_ts="1.000200"
            )
        ),
        support_channels=SUPPORT_CHANNELS,
    )
    assert root is not None and reply is not None
    assert root.key == reply.key == ConversationKey(channel="slack", chat_id=SUPPORT, thread_id="1.000200")
    assert root.message_id != reply.message_id


def test_message_and_app_mention_of_one_message_get_the_same_id() -> None:
    text = f"<@{BOT_USER}> 我的发票开错了"
    as_message = to_inbound(
        event_callback(message_event(text, channel=SUPPORT, channel_type="channel", ts="5.5")),
        support_channels=SUPPORT_CHANNELS,
    )
    as_mention = to_inbound(
        event_callback(mention_event(text, channel=SUPPORT, ts="5.5")), support_channels=SUPPORT_CHANNELS
    )
    assert as_message is not None and as_mention is not None
    assert as_message.message_id == as_mention.message_id
    assert as_message.key == as_mention.key
    assert as_message.text == as_mention.text == "我的发票开错了"
    assert as_message.language == "zh"


def test_outside_support_channels_only_mentions_count() -> None:
    assert (
        to_inbound(
            event_callback(message_event("chat", channel=GENERAL, channel_type="channel")),
            support_channels=SUPPORT_CHANNELS,
        )
        is None
    )
    mention = to_inbound(
        event_callback(mention_event(f"<@{BOT_USER}> help", channel=GENERAL, ts="9.1", thread_ts="9.0")),
        support_channels=SUPPORT_CHANNELS,
    )
    assert mention is not None and mention.key.thread_id == "9.0"


def test_a_file_with_a_caption_is_still_the_customer_writing() -> None:
    event = message_event("screenshot of the error", subtype="file_share", files=[{"id": "F1"}])
    message = to_inbound(event_callback(event), support_channels=())
    assert message is not None and message.text == "screenshot of the error"


@pytest.mark.parametrize(
    ("wire", "readable"),
    [
        (f"<@{BOT_USER}> hello", "hello"),
        (f"hey <@{BOT_USER}>, my order", "hey , my order"),
        ("ask <@U123ABC|alice> please", "ask @alice please"),
        ("see <#C1234|billing>", "see #billing"),
        ("<!here> anyone?", "@here anyone?"),
        (
            "go to <https://example.com/a?b=1&amp;c=2|the page>",
            "go to the page (https://example.com/a?b=1&c=2)",
        ),
        ("<https://example.com>", "https://example.com"),
        ("<mailto:a@example.com|a@example.com>", "a@example.com"),
        ("1 &lt; 2 &amp;&amp; 3 &gt; 2 &amp;lt;", "1 < 2 && 3 > 2 &lt;"),
    ],
)
def test_slack_wire_text_becomes_what_the_customer_typed(wire: str, readable: str) -> None:
    assert plain_text(wire, bot_ids={BOT_USER}) == readable


def test_an_app_mention_without_authorizations_still_drops_the_leading_mention() -> None:
    payload = event_callback(mention_event("<@UOTHERBOT> where is my order?", channel=GENERAL))
    payload["authorizations"] = []
    message = to_inbound(payload, support_channels=())
    assert message is not None and message.text == "where is my order?"


@pytest.mark.parametrize(
    ("markdown", "mrkdwn"),
    [
        ("**Order 1234** has shipped", "*Order 1234* has shipped"),
        ("This is *important*", "This is _important_"),
        ("a < b & c > d", "a &lt; b &amp; c &gt; d"),
        ("## Refunds", "*Refunds*"),
        ("- first\n* second", "• first\n• second"),
        ("[track it](https://t.example.com/?id=1&x=2)", "<https://t.example.com/?id=1&amp;x=2|track it>"),
        ("~~old~~ new", "~old~ new"),
        ("run `a**b**c` now", "run `a**b**c` now"),
        ("```\nx = **1** < 2\n```", "```\nx = **1** &lt; 2\n```"),
        ("您的订单**已发货**，请查收", "您的订单*已发货*，请查收"),
    ],
)
def test_markdown_is_rendered_as_slack_mrkdwn(markdown: str, mrkdwn: str) -> None:
    assert render_mrkdwn(markdown) == mrkdwn


def test_split_prefers_paragraphs_then_sentences_and_respects_the_limit() -> None:
    text = "\n\n".join(["A" * 60, "B" * 60, "C" * 60])
    assert split_message(text, limit=130) == ["A" * 60 + "\n\n" + "B" * 60, "C" * 60]
    chinese = "这是第一句话。" * 30
    parts = split_message(chinese, limit=50)
    assert all(len(p) <= 50 for p in parts)
    assert all(p.endswith("。") for p in parts)
    assert "".join(parts) == chinese


def test_split_never_cuts_an_entity_and_keeps_code_blocks_closed() -> None:
    escaped = "x" * 47 + "&amp;" + "y" * 10
    parts = split_message(escaped, limit=50)
    assert "".join(parts) == escaped
    assert all("&amp;" in p or "&" not in p for p in parts)

    code = "```\n" + "\n".join(f"line {i}" for i in range(40)) + "\n```"
    parts = split_message(code, limit=100)
    assert len(parts) > 1
    assert all(p.startswith("```") and p.endswith("```") for p in parts)
    assert all(len(p) <= 100 for p in parts)
