"""SlackSender against the fake Web API: streaming by edits, retries, refusals, re-processing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from adapters.slack import SlackSender, build_client
from core.errors import DeliveryError
from core.messages import Button, ConversationKey, InboundMessage, Reply, ReplyDelta, ReplyDone, ReplyEvent
from core.stores.memory import MemoryStore
from tests.slack.conftest import SUPPORT
from tests.slack.fake_slack import FakeSlack, Scripted

KEY = ConversationKey(channel="slack", chat_id=SUPPORT, thread_id="1700000000.000001")
MESSAGE = InboundMessage(key=KEY, user_id="UCUSTOMER", message_id=f"{SUPPORT}:1700000000.000001", text="hi")


def sender(fake: FakeSlack, *, store: MemoryStore | None = None, interval: float = 3600.0) -> SlackSender:
    client = build_client(token="xoxb-test-token", base_url=fake.api_base, max_rate_limit_retries=2)
    return SlackSender(client=client, store=store, update_interval=interval)


async def stream(*pieces: str, final: str | None = None) -> AsyncIterator[ReplyEvent]:
    for piece in pieces:
        yield ReplyDelta(text=piece)
    yield ReplyDone(reply=Reply(key=KEY, text=final or "".join(pieces), in_reply_to=MESSAGE.message_id))


async def test_a_streamed_answer_is_one_message_edited_to_the_final_text(fake_slack: FakeSlack) -> None:
    reply = await sender(fake_slack).deliver(
        MESSAGE, stream("Your ", "order ", "**has shipped**", final="Your order **has shipped**.")
    )
    assert reply.text == "Your order **has shipped**."
    [shown] = fake_slack.thread(SUPPORT, KEY.thread_id)
    assert shown.text == "Your order *has shipped*."  # the final (moderated) text, rendered
    posts = fake_slack.calls_of("chat.postMessage")
    assert len(posts) == 1
    assert posts[0].params["text"] == "Your …"  # the preview appeared with the first words
    # throttled: within one interval, the deltas caused no edits; only the final text did
    assert len(fake_slack.calls_of("chat.update")) == 1


async def test_with_no_throttle_each_delta_edits_the_preview(fake_slack: FakeSlack) -> None:
    await sender(fake_slack, interval=0.0).deliver(MESSAGE, stream("a ", "b ", "c"))
    updates = [call.params["text"] for call in fake_slack.calls_of("chat.update")]
    assert updates == ["a b …", "a b c …", "a b c"]


async def test_an_answer_without_deltas_is_posted_once(fake_slack: FakeSlack) -> None:
    await sender(fake_slack).deliver(MESSAGE, stream(final="您好，请问有什么可以帮您？"))
    assert [m.text for m in fake_slack.thread(SUPPORT, KEY.thread_id)] == ["您好，请问有什么可以帮您？"]
    assert fake_slack.calls_of("chat.update") == []


async def test_reprocessing_a_message_edits_what_was_posted_instead_of_posting_again(
    fake_slack: FakeSlack,
) -> None:
    store = MemoryStore()
    # The first attempt shows a preview, then the final post fails for good (e.g. the process dies).
    fake_slack.script("chat.update", Scripted(200, {"ok": False, "error": "internal_error"}))
    with pytest.raises(DeliveryError):
        await sender(fake_slack, store=store).deliver(
            MESSAGE, stream("Partial ", "answer", final="Full answer")
        )
    assert [m.text for m in fake_slack.thread(SUPPORT, KEY.thread_id)] == ["Partial …"]

    # The worker processes the message again (another process): the same Slack message is completed.
    await sender(fake_slack, store=store).deliver(MESSAGE, stream(final="Full answer"))
    assert [m.text for m in fake_slack.thread(SUPPORT, KEY.thread_id)] == ["Full answer"]
    assert len(fake_slack.calls_of("chat.postMessage")) == 1


async def test_rate_limit_is_waited_out_and_the_message_sent_once(fake_slack: FakeSlack) -> None:
    fake_slack.script(
        "chat.postMessage", Scripted(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": "1"})
    )
    await sender(fake_slack).send(Reply(key=KEY, text="Thanks for waiting"))
    assert len(fake_slack.calls_of("chat.postMessage")) == 2
    assert [m.text for m in fake_slack.thread(SUPPORT, KEY.thread_id)] == ["Thanks for waiting"]


async def test_a_refusal_or_endless_rate_limit_is_a_delivery_error(fake_slack: FakeSlack) -> None:
    fake_slack.script("chat.postMessage", Scripted(200, {"ok": False, "error": "channel_not_found"}))
    with pytest.raises(DeliveryError, match="channel_not_found"):
        await sender(fake_slack).send(Reply(key=KEY, text="hello"))

    limited = Scripted(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": "0"})
    fake_slack.script("chat.postMessage", limited, limited, limited)
    with pytest.raises(DeliveryError, match="ratelimited"):
        await sender(fake_slack).send(Reply(key=KEY, text="hello"))
    assert fake_slack.thread(SUPPORT, KEY.thread_id) == []


async def test_unreachable_slack_is_a_delivery_error() -> None:
    client = build_client(token="xoxb-test-token", base_url="http://127.0.0.1:9/api/")
    with pytest.raises(DeliveryError, match="unreachable"):
        await SlackSender(client=client).send(Reply(key=KEY, text="hello"))


async def test_buttons_degrade_to_a_list(fake_slack: FakeSlack) -> None:
    reply = Reply(
        key=KEY,
        text="Which order?",
        buttons=(Button(label="Order 1", value="1"), Button(label="Order 2", value="2")),
    )
    await sender(fake_slack).send(reply)
    assert fake_slack.thread(SUPPORT, KEY.thread_id)[0].text == "Which order?\n\n• Order 1\n• Order 2"
