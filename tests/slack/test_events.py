"""``POST /slack/events`` end to end: signed event -> gateway -> inbox -> worker -> fake Slack Web API."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from adapters.slack import MESSAGE_LIMIT
from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from core.messages import ConversationKey
from tests.slack.conftest import (
    BOT_USER,
    DM,
    GENERAL,
    SUPPORT,
    Gateway,
    event_callback,
    mention_event,
    message_event,
    next_ts,
    running_gateway,
    signed_headers,
    slack_settings,
)
from tests.slack.fake_slack import FakeSlack, Scripted


async def test_a_direct_message_is_answered_in_the_dm(gateway: Gateway) -> None:
    response = await gateway.post_event(event_callback(message_event("where is my order 1234?")))
    assert response.status_code == 200

    await gateway.fake.wait_until(
        lambda: any(m.text == "Answer to: where is my order 1234?" for m in gateway.fake.thread(DM, None))
    )
    await gateway.idle()
    shown = gateway.fake.thread(DM, None)
    assert [m.text for m in shown] == ["Answer to: where is my order 1234?"]
    post = gateway.fake.calls_of("chat.postMessage")[0]
    assert post.authorization == "Bearer xoxb-test-token"
    assert post.params["channel"] == DM
    assert "thread_ts" not in post.params  # a plain DM is answered in the DM, not in a thread


async def test_support_channel_message_is_answered_in_its_thread_and_the_thread_continues(
    gateway: Gateway, model: FunctionModel
) -> None:
    root = next_ts()
    await gateway.post_event(
        event_callback(message_event("My parcel is late", channel=SUPPORT, channel_type="channel", ts=root))
    )
    await gateway.fake.wait_until(lambda: len(gateway.fake.thread(SUPPORT, root)) == 1)
    await gateway.idle()
    assert gateway.fake.thread(SUPPORT, root)[0].text == "Answer to: My parcel is late"

    # A reply in the thread, without any mention, continues the same conversation.
    await gateway.post_event(
        event_callback(
            message_event("It was due on Monday", channel=SUPPORT, channel_type="channel", thread_ts=root)
        )
    )
    await gateway.fake.wait_until(lambda: len(gateway.fake.thread(SUPPORT, root)) == 2)
    await gateway.idle()
    assert [m.text for m in gateway.fake.thread(SUPPORT, root)] == [
        "Answer to: My parcel is late",
        "Answer to: It was due on Monday",
    ]
    second: ChatRequest = model.requests[-1]
    contents = [(m.role, m.content) for m in second.messages]
    assert ("user", "My parcel is late") in contents
    assert ("assistant", "Answer to: My parcel is late") in contents
    assert contents[-1] == ("user", "It was due on Monday")


async def test_mention_in_another_channel_is_answered_without_the_mention(
    gateway: Gateway, model: FunctionModel
) -> None:
    ts = next_ts()
    await gateway.post_event(
        event_callback(mention_event(f"<@{BOT_USER}> what are your hours?", channel=GENERAL, ts=ts))
    )
    await gateway.fake.wait_until(lambda: len(gateway.fake.thread(GENERAL, ts)) == 1)
    await gateway.idle()
    assert gateway.fake.thread(GENERAL, ts)[0].text == "Answer to: what are your hours?"
    assert model.requests[0].messages[-1].content == "what are your hours?"


async def test_chinese_text_is_answered_in_chinese(gateway: Gateway) -> None:
    await gateway.post_event(event_callback(message_event("你好，我的订单到哪了？")))
    await gateway.fake.wait_until(lambda: len(gateway.fake.thread(DM, None)) == 1)
    await gateway.idle()
    assert gateway.fake.thread(DM, None)[0].text == "Answer to: 你好，我的订单到哪了？"
    row = await gateway.runtime.conversations.get(ConversationKey(channel="slack", chat_id=DM))
    assert row is not None and row.language == "zh"


async def _answered_only_the_marker(gateway: Gateway, model: FunctionModel) -> None:
    """Send an answerable DM after the events under test; once it is answered, nothing else may be."""
    await gateway.post_event(event_callback(message_event("marker question")))
    await gateway.fake.wait_until(lambda: len(gateway.fake.calls_of("chat.postMessage")) >= 1)
    await gateway.idle()
    posts = gateway.fake.calls_of("chat.postMessage")
    assert [p.params["channel"] for p in posts] == [DM]
    assert [last for last in (r.messages[-1].content for r in model.requests)] == ["marker question"]


async def test_plain_message_in_a_non_support_channel_is_ignored(
    gateway: Gateway, model: FunctionModel
) -> None:
    response = await gateway.post_event(
        event_callback(message_event("just chatting", channel=GENERAL, channel_type="channel"))
    )
    assert response.status_code == 200
    await _answered_only_the_marker(gateway, model)


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(
            {"bot_id": "BBOT", "user": BOT_USER, "app_id": "A1", "bot_profile": {"id": "BBOT"}}, id="own-bot"
        ),
        pytest.param({"subtype": "bot_message", "bot_id": "BOTHER", "username": "other bot"}, id="other-bot"),
        pytest.param({"bot_id": "BOTHER", "user": "UOTHERBOT"}, id="other-bot-with-user"),
        pytest.param(
            {
                "subtype": "message_changed",
                "hidden": True,
                "message": {"type": "message", "user": "UCUSTOMER", "text": "edited", "ts": "1.0"},
            },
            id="edit",
        ),
        pytest.param({"subtype": "message_deleted", "hidden": True, "deleted_ts": "1.0"}, id="deletion"),
        pytest.param({"subtype": "channel_join"}, id="join"),
    ],
)
async def test_bots_edits_deletions_and_other_subtypes_are_not_answered(
    gateway: Gateway, model: FunctionModel, event: dict[str, Any]
) -> None:
    for channel, channel_type in ((SUPPORT, "channel"), (DM, "im")):
        payload = event_callback(
            message_event("a message", channel=channel, channel_type=channel_type, **event)
        )
        response = await gateway.post_event(payload)
        assert response.status_code == 200
    await _answered_only_the_marker(gateway, model)


async def test_retries_of_the_same_event_are_answered_once(gateway: Gateway, model: FunctionModel) -> None:
    payload = event_callback(message_event("is my refund processed?"))
    first = await gateway.post_event(payload)
    retries = [
        await gateway.post_event(
            payload, headers={"X-Slack-Retry-Num": str(n), "X-Slack-Retry-Reason": "http_timeout"}
        )
        for n in (1, 2)
    ]
    assert [r.status_code for r in (first, *retries)] == [200, 200, 200]
    await gateway.fake.wait_until(lambda: len(gateway.fake.calls_of("chat.postMessage")) >= 1)
    await gateway.idle()
    assert len(gateway.fake.calls_of("chat.postMessage")) == 1
    assert len(model.requests) == 1


async def test_message_and_app_mention_of_the_same_message_are_answered_once(
    gateway: Gateway, model: FunctionModel
) -> None:
    ts = next_ts()
    text = f"<@{BOT_USER}> my invoice is wrong"
    await gateway.post_event(
        event_callback(message_event(text, channel=SUPPORT, channel_type="channel", ts=ts))
    )
    await gateway.post_event(event_callback(mention_event(text, channel=SUPPORT, ts=ts)))
    await gateway.fake.wait_until(lambda: len(gateway.fake.thread(SUPPORT, ts)) >= 1)
    await gateway.idle()
    assert [m.text for m in gateway.fake.thread(SUPPORT, ts)] == ["Answer to: my invoice is wrong"]
    assert len(model.requests) == 1


async def test_url_verification_returns_the_challenge(gateway: Gateway) -> None:
    challenge = "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    response = await gateway.post_event({"token": "x", "challenge": challenge, "type": "url_verification"})
    assert response.status_code == 200
    assert response.json() == {"challenge": challenge}


async def test_forged_and_stale_requests_are_refused_and_logged(
    gateway: Gateway, model: FunctionModel, caplog: pytest.LogCaptureFixture
) -> None:
    body = json.dumps(event_callback(message_event("forged"))).encode()
    forged = await gateway.http.post(
        "/slack/events", content=body, headers=signed_headers(body, secret="not-the-signing-secret")
    )
    stale_body = json.dumps(event_callback(message_event("replayed"))).encode()
    stale = await gateway.http.post(
        "/slack/events",
        content=stale_body,
        headers=signed_headers(stale_body, timestamp=int(time.time()) - 301),
    )
    unsigned = await gateway.http.post(
        "/slack/events", content=body, headers={"Content-Type": "application/json"}
    )
    # a valid signature of another body
    tampered = await gateway.http.post(
        "/slack/events", content=body.replace(b"forged", b"FORGED"), headers=signed_headers(body)
    )
    assert [r.status_code for r in (forged, stale, unsigned, tampered)] == [401, 401, 401, 401]
    refusals = [
        r.getMessage() for r in caplog.records if r.name == "bots.slack" and r.levelno == logging.WARNING
    ]
    assert any("bad signature" in m for m in refusals)
    assert any("stale timestamp" in m for m in refusals)
    assert any("missing signature" in m for m in refusals)
    await _answered_only_the_marker(gateway, model)


async def test_malformed_and_oversized_bodies_are_4xx_and_nothing_breaks(
    gateway: Gateway, model: FunctionModel
) -> None:
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        response = await gateway.http.post("/slack/events", content=raw, headers=signed_headers(raw))
        assert response.status_code in (400, 401), raw
        assert response.status_code < 500
    bad_json = b'{"type": "event_callback", '
    assert (
        await gateway.http.post("/slack/events", content=bad_json, headers=signed_headers(bad_json))
    ).status_code == 400

    huge = json.dumps(event_callback(message_event("x" * (600 * 1024)))).encode()
    response = await gateway.http.post("/slack/events", content=huge, headers=signed_headers(huge))
    assert response.status_code == 413
    assert response.headers["x-slack-no-retry"] == "1"

    odd = [
        event_callback({"type": "message"}),  # no channel, no ts
        event_callback({"type": "message", "channel": DM, "channel_type": "im", "text": "no user, no ts"}),
        {"type": "event_callback", "event": "not an object"},
        {"type": "event_callback"},
        {"type": "something_new"},
        event_callback({"type": "reaction_added", "user": "U1", "reaction": "thumbsup"}),
    ]
    for payload in odd:
        assert (await gateway.post_event(payload)).status_code == 200
    await _answered_only_the_marker(gateway, model)


async def test_rate_limited_post_is_retried_and_delivered_once(gateway: Gateway) -> None:
    gateway.fake.script(
        "chat.postMessage", Scripted(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": "1"})
    )
    await gateway.post_event(event_callback(message_event("hello there")))
    await gateway.fake.wait_until(lambda: len(gateway.fake.thread(DM, None)) == 1, within=15)
    await gateway.idle(within=15)
    assert len(gateway.fake.calls_of("chat.postMessage")) == 2  # the 429, then the retry
    assert [m.text for m in gateway.fake.thread(DM, None)] == ["Answer to: hello there"]


async def test_a_long_answer_is_split_into_several_messages_in_the_thread(
    tmp_path: Path, fake_slack: FakeSlack
) -> None:
    paragraphs = [f"Paragraph {i}: " + " ".join(["details of the return policy"] * 30) for i in range(12)]
    long_answer = "\n\n".join(paragraphs)
    model = FunctionModel(lambda request: long_answer)
    async with running_gateway(slack_settings(tmp_path, fake_slack), fake_slack, model) as gateway:
        root = next_ts()
        await gateway.post_event(
            event_callback(message_event("policy?", channel=SUPPORT, channel_type="channel", ts=root))
        )
        await gateway.fake.wait_until(lambda: len(gateway.fake.thread(SUPPORT, root)) >= 3)
        await gateway.idle()
        shown = gateway.fake.thread(SUPPORT, root)
    assert len(long_answer) > 2 * MESSAGE_LIMIT
    assert all(len(m.text) <= MESSAGE_LIMIT for m in shown)
    # every part ends at a paragraph boundary and together they are the whole answer
    assert "\n\n".join(m.text for m in shown) == long_answer
    assert all(m.text.startswith("Paragraph ") for m in shown)


async def test_routes_are_404_when_slack_is_not_configured(tmp_path: Path, fake_slack: FakeSlack) -> None:
    settings = slack_settings(tmp_path, fake_slack, slack_bot_token=None, slack_signing_secret=None)
    async with running_gateway(settings, fake_slack, FunctionModel(lambda r: "x")) as gateway:
        response = await gateway.post_event(event_callback(message_event("hello")))
    assert response.status_code == 404
