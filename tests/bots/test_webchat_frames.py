"""adapters.webchat: browser frames to InboundMessage and reply events to frames."""

from __future__ import annotations

import json

import pytest

from adapters import webchat
from core.messages import ConversationKey, Reply, ReplyDelta, ReplyDone, ReplySource

SESSION = "abcDEF12_-"


def test_a_message_frame_becomes_an_inbound_message_of_the_session() -> None:
    message = webchat.to_inbound(SESSION, {"type": "message", "id": "m-1", "text": "我的订单到哪了"})
    assert message.key == ConversationKey(channel="web", chat_id=SESSION)
    assert message.user_id == SESSION
    assert message.message_id == "m-1"
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
