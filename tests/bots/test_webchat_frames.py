"""adapters.webchat: browser frames to InboundMessage and reply events to frames."""

from __future__ import annotations

import asyncio
import json

import pytest

from adapters import webchat
from core.messages import ConversationKey, Reply, ReplyDelta, ReplyDone, ReplySource
from core.stores.memory import MemoryStore

SESSION = "abcDEF12_-"


def test_a_message_frame_becomes_an_inbound_message_of_the_session() -> None:
    message = webchat.to_inbound(SESSION, {"type": "message", "id": "m-1", "text": "我的订单到哪了"})
    assert message.key == ConversationKey(channel="web", chat_id=SESSION)
    assert message.user_id == SESSION
    # The platform id carries the session: "m-1" in another browser is another message.
    assert message.message_id == f"{SESSION}:m-1"
    assert message.text == "我的订单到哪了"
    assert message.language == "zh"


def test_language_comes_from_the_text_unless_the_page_says() -> None:
    assert webchat.to_inbound(SESSION, {"text": "where is my order"}).language == "en"
    assert webchat.to_inbound(SESSION, {"text": "KF20251103001", "lang": "en"}).language == "en"
    assert webchat.to_inbound(SESSION, {"text": "hello", "lang": "zh"}).language == "zh"
    # an unknown lang value is ignored rather than trusted
    assert webchat.to_inbound(SESSION, {"text": "hello", "lang": "fr"}).language == "en"


def test_a_missing_or_unusable_client_id_is_replaced_by_a_generated_one() -> None:
    first = webchat.to_inbound(SESSION, {"text": "hi"})
    second = webchat.to_inbound(SESSION, {"text": "hi", "id": "<script>"})
    assert first.message_id and second.message_id
    assert first.message_id != second.message_id
    assert "<" not in second.message_id


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("nope", "bad_json"),
        ("[1, 2]", "bad_frame"),
        (b"\xff\xfe", "bad_json"),
        ("x" * (webchat.MAX_FRAME_BYTES + 1), "too_large"),
    ],
)
def test_undecodable_frames_raise_frame_errors(raw: str | bytes, code: str) -> None:
    with pytest.raises(webchat.FrameError) as error:
        webchat.decode_frame(raw)
    assert error.value.code == code


def test_the_size_limit_counts_utf8_bytes() -> None:
    just_fits = json.dumps({"text": "长" * 21_000}, ensure_ascii=False)  # 63 KB
    assert webchat.decode_frame(just_fits)["text"] == "长" * 21_000
    with pytest.raises(webchat.FrameError):
        webchat.decode_frame(json.dumps({"text": "长" * 22_000}, ensure_ascii=False))  # 66 KB


@pytest.mark.parametrize(
    ("frame", "code"),
    [({}, "missing_text"), ({"text": None}, "missing_text"), ({"type": "typing", "text": "x"}, "bad_type")],
)
def test_frames_without_a_message_raise_frame_errors(frame: dict[str, object], code: str) -> None:
    with pytest.raises(webchat.FrameError) as error:
        webchat.to_inbound(SESSION, frame)
    assert error.value.code == code


@pytest.mark.parametrize("session", ["", "short", "with space!", "a:b:c:d:e", "x" * 65])
def test_session_ids_are_validated(session: str) -> None:
    assert not webchat.valid_session_id(session)
    with pytest.raises(webchat.FrameError):
        webchat.to_inbound(session, {"text": "hi"})


def test_generated_session_ids_are_valid_and_distinct() -> None:
    ids = {webchat.new_session_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(webchat.valid_session_id(value) for value in ids)


def test_reply_events_render_to_frames() -> None:
    key = ConversationKey(channel="web", chat_id=SESSION)
    delta = webchat.delta_frame(ReplyDelta(text="您"), in_reply_to="m-1")
    assert delta == {"type": "delta", "text": "您", "id": "m-1"}
    done = ReplyDone(
        reply=Reply(key=key, text="您好", language="zh", in_reply_to="m-1", source=ReplySource.FAQ_CACHE)
    )
    assert webchat.reply_frame(done) == {
        "type": "reply",
        "text": "您好",
        "source": "faq_cache",
        "id": "m-1",
        "lang": "zh",
    }
    # Chinese goes over the wire as UTF-8, not \\u escapes
    assert webchat.encode(webchat.reply_frame(done)).count("您好") == 1


def test_replies_name_the_pages_own_message_id() -> None:
    message = webchat.to_inbound(SESSION, {"id": "m-7", "text": "hi"})
    assert webchat.client_id_of(message.message_id) == "m-7"
    assert webchat.delta_frame(ReplyDelta(text="h"), in_reply_to=message.message_id)["id"] == "m-7"
    assert webchat.held_frame(message.message_id) == {"type": "held", "id": "m-7"}
    assert webchat.client_id_of(None) is None


@pytest.mark.parametrize(
    ("value", "since"), [(None, None), ("0", 0), ("42", 42), ("-1", None), ("x", None), ("9" * 40, None)]
)
def test_since_is_a_reply_number_or_absent(value: str | None, since: int | None) -> None:
    assert webchat.parse_since(value) == since


def reply(n: int, text: str = "") -> Reply:
    key = ConversationKey(channel="web", chat_id=SESSION)
    return Reply(key=key, text=text or f"answer {n}", language="en", in_reply_to=f"{SESSION}:m{n}")


async def test_sent_replies_are_numbered_and_kept_for_a_reconnecting_page() -> None:
    store = MemoryStore()
    sender = webchat.WebChatSender(store=store)
    for n in range(1, 4):
        await sender.send(reply(n))
    await sender.send(reply(4).model_copy(update={"text": ""}))  # a person has it: nothing to show

    kept = await webchat.read_backlog(store, SESSION, since=1)
    assert [seq for seq, _ in kept] == [2, 3]
    assert [json.loads(raw)["id"] for _, raw in kept] == ["m2", "m3"]
    assert await webchat.read_backlog(store, SESSION, since=3) == []
    # A page that saw more than exist saw an earlier numbering (it expired): it gets everything kept.
    assert [seq for seq, _ in await webchat.read_backlog(store, SESSION, since=99)] == [1, 2, 3]
    assert await webchat.read_backlog(store, "otherSession1", since=0) == []


async def test_a_reconnect_replays_at_most_the_latest_replies() -> None:
    store = MemoryStore()
    sender = webchat.WebChatSender(store=store)
    for n in range(1, webchat.BACKLOG_SIZE + 11):
        await sender.send(reply(n))
    kept = await webchat.read_backlog(store, SESSION, since=0)
    assert [seq for seq, _ in kept] == list(range(11, webchat.BACKLOG_SIZE + 11))


async def test_kept_replies_expire() -> None:
    store = MemoryStore()
    await webchat.WebChatSender(store=store, backlog_ttl=0.1).send(reply(1))
    await asyncio.sleep(0.25)
    assert await webchat.read_backlog(store, SESSION, since=0) == []
