"""The WeChat wire format without a server: signatures, safe mode, XML translation, rendering, splitting."""

from __future__ import annotations

import time

import pytest
import xmltodict
from hypothesis import given
from hypothesis import strategies as st
from wechatpy.crypto import WeChatCrypto

from adapters import wechat
from core.messages import Button, ConversationKey, Reply
from core.texts import text as fixed_text
from tests.wechat.conftest import (
    ACCOUNT,
    AES_KEY,
    APPID,
    OLD_AES_KEY,
    OPENID,
    OTHER_AES_KEY,
    TOKEN,
    encrypted_request,
    event_xml,
    message_xml,
    sign,
    text_xml,
)

# --- signatures --------------------------------------------------------------------------------------


def test_signature_is_sha1_of_the_sorted_joined_parts() -> None:
    # The example from WeChat's documentation of the URL check.
    token, timestamp, nonce = "token", "1409304348", "xxxxxx"
    expected = sign(token, timestamp, nonce)
    assert wechat.sign(token, timestamp, nonce) == expected
    assert wechat.signature_ok(token=token, signature=expected, timestamp=timestamp, nonce=nonce)
    assert not wechat.signature_ok(token=token, signature=expected.upper(), timestamp=timestamp, nonce=nonce)
    assert not wechat.signature_ok(token="other", signature=expected, timestamp=timestamp, nonce=nonce)


def test_check_request_refuses_missing_forged_and_stale_requests() -> None:
    now = 1_700_000_000
    stamp = str(now)
    good = sign(TOKEN, stamp, "n")
    wechat.check_request(token=TOKEN, signature=good, timestamp=stamp, nonce="n", now=now + 299)
    with pytest.raises(wechat.Forbidden, match="missing"):
        wechat.check_request(token=TOKEN, signature=None, timestamp=stamp, nonce="n", now=now)
    with pytest.raises(wechat.Forbidden, match="signature"):
        wechat.check_request(token=TOKEN, signature="0" * 40, timestamp=stamp, nonce="n", now=now)
    with pytest.raises(wechat.Forbidden, match="off"):
        wechat.check_request(token=TOKEN, signature=good, timestamp=stamp, nonce="n", now=now + 301)
    with pytest.raises(wechat.Forbidden, match="number"):
        wechat.check_request(token=TOKEN, signature=good, timestamp="soon", nonce="n", now=now)


# --- safe mode ---------------------------------------------------------------------------------------


def _envelope(xml: str, key: str) -> tuple[dict[str, str], dict[str, str]]:
    query, body = encrypted_request(xml, aes_key=key)
    return query, xmltodict.parse(body)["xml"]


def test_safe_mode_decrypts_with_the_current_then_the_previous_key() -> None:
    safe = wechat.SafeMode(token=TOKEN, appid=APPID, aes_key=AES_KEY, previous_aes_key=OLD_AES_KEY)
    for key, index in ((AES_KEY, 0), (OLD_AES_KEY, 1)):
        query, envelope = _envelope(text_xml("你好"), key)
        opened = safe.decrypt(
            envelope, msg_signature=query["msg_signature"], timestamp=query["timestamp"], nonce=query["nonce"]
        )
        assert opened.key_index == index
        assert wechat.parse_xml(opened.xml)["Content"] == "你好"

    query, envelope = _envelope(text_xml("你好"), OTHER_AES_KEY)
    with pytest.raises(wechat.BadRequest, match="cannot decrypt"):
        safe.decrypt(
            envelope, msg_signature=query["msg_signature"], timestamp=query["timestamp"], nonce=query["nonce"]
        )


def test_safe_mode_refuses_a_forged_msg_signature_before_decrypting() -> None:
    safe = wechat.SafeMode(token=TOKEN, appid=APPID, aes_key=AES_KEY)
    query, envelope = _envelope(text_xml("你好"), AES_KEY)
    for forged in ("0" * 40, None, ""):
        with pytest.raises(wechat.Forbidden):
            safe.decrypt(envelope, msg_signature=forged, timestamp=query["timestamp"], nonce=query["nonce"])
    # a message for another official account (same key, other AppID) is not ours
    other_app = WeChatCrypto(TOKEN, AES_KEY, "wx_other_app_id").encrypt_message(text_xml("x"), "n", "1")
    envelope = xmltodict.parse(other_app)["xml"]
    with pytest.raises(wechat.BadRequest):
        safe.decrypt(envelope, msg_signature=envelope["MsgSignature"], timestamp="1", nonce="n")


def test_safe_mode_reply_is_readable_by_wechat() -> None:
    safe = wechat.SafeMode(token=TOKEN, appid=APPID, aes_key=AES_KEY, previous_aes_key=OLD_AES_KEY)
    xml = wechat.passive_text_xml(openid=OPENID, account=ACCOUNT, content="答复")
    stamp = str(int(time.time()))
    for key, index in ((AES_KEY, 0), (OLD_AES_KEY, 1)):
        envelope = xmltodict.parse(safe.encrypt(xml, nonce="abc", timestamp=stamp, key_index=index))["xml"]
        assert envelope["MsgSignature"] == sign(TOKEN, stamp, "abc", envelope["Encrypt"])
        plain = WeChatCrypto(TOKEN, key, APPID).decrypt_message(
            envelope, envelope["MsgSignature"], stamp, "abc"
        )
        assert xmltodict.parse(plain)["xml"]["Content"] == "答复"


@pytest.mark.parametrize("bad", ["short", AES_KEY[:-1] + "!", ""])
def test_safe_mode_refuses_a_malformed_key(bad: str) -> None:
    with pytest.raises(ValueError, match="KEFU_WECHAT_AES_KEY"):
        wechat.SafeMode(token=TOKEN, appid=APPID, aes_key=bad or "x")


# --- XML ---------------------------------------------------------------------------------------------


def test_parse_xml_refuses_entities_and_non_wechat_documents() -> None:
    with pytest.raises(wechat.BadRequest):
        wechat.parse_xml('<!DOCTYPE x [<!ENTITY a "b">]><xml><A>&a;</A></xml>')
    with pytest.raises(wechat.BadRequest):
        wechat.parse_xml('<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><xml><A>&e;</A></xml>')
    with pytest.raises(wechat.BadRequest):
        wechat.parse_xml("<xml>just text</xml>")
    with pytest.raises(wechat.BadRequest):
        wechat.check_fields(wechat.parse_xml("<xml><MsgType>text</MsgType></xml>"))


def test_text_message_becomes_an_inbound_message() -> None:
    fields = wechat.parse_xml(text_xml("我的订单到哪了", msg_id="6054768590064713728"))
    message = wechat.to_inbound(fields, passive_until=123.5)
    assert message is not None
    assert message.key == ConversationKey(channel="wechat", chat_id=OPENID)
    assert message.user_id == OPENID
    assert message.message_id == "6054768590064713728"
    assert message.text == "我的订单到哪了"
    assert message.language == "zh"
    assert message.extras["openid"] == OPENID
    assert message.extras["account"] == ACCOUNT
    assert message.extras["passive_until"] == 123.5


def test_language_is_detected_from_the_text_and_chinese_by_default() -> None:
    english = wechat.to_inbound(wechat.parse_xml(text_xml("where is my order")))
    assert english is not None and english.language == "en"
    blank = wechat.to_inbound(wechat.parse_xml(text_xml(" ")))
    assert blank is not None and blank.language == "zh"
    click = wechat.to_inbound(wechat.parse_xml(event_xml("CLICK", EventKey="ORDER_STATUS")))
    assert click is not None and click.language == "zh"  # a menu key says nothing about the customer


def test_events_are_deduped_on_sender_time_and_event() -> None:
    click = wechat.parse_xml(event_xml("CLICK", create_time=1_700_000_000, EventKey="K1"))
    message = wechat.to_inbound(click)
    assert message is not None
    assert message.message_id == f"ev:{OPENID}:1700000000:click:K1"
    assert message.text == "K1"
    assert message.extras["event_key"] == "K1"
    # the same event retried is the same id; the next click is another
    assert wechat.to_inbound(click) is not None
    assert wechat.to_inbound(click).message_id == message.message_id  # type: ignore[union-attr]
    later = wechat.to_inbound(wechat.parse_xml(event_xml("CLICK", create_time=1_700_000_001, EventKey="K1")))
    assert later is not None and later.message_id != message.message_id


def test_what_is_answered_by_the_engine_by_a_fixed_text_or_not_at_all() -> None:
    voice = wechat.parse_xml(message_xml("voice", MediaId="m", Recognition="查询快递", MsgId="1"))
    recognised = wechat.to_inbound(voice)
    assert recognised is not None and recognised.text == "查询快递"
    assert wechat.canned_reply(voice) is None

    cases = {
        message_xml("image", PicUrl="u", MediaId="m", MsgId="2"): "wechat_image_received",
        message_xml("voice", MediaId="m", MsgId="3"): "wechat_voice_unrecognized",
        message_xml("location", Location_X="1", Location_Y="2", MsgId="4"): "wechat_unsupported",
        event_xml("subscribe"): "greeting",
        event_xml("unsubscribe"): None,
        event_xml("VIEW", EventKey="https://example.com"): None,
        event_xml("TEMPLATESENDJOBFINISH"): None,
    }
    for xml, expected in cases.items():
        fields = wechat.parse_xml(xml)
        assert wechat.to_inbound(fields) is None, xml
        assert wechat.canned_reply(fields) == expected, xml
    assert not wechat.opens_window(wechat.parse_xml(event_xml("unsubscribe")))
    assert wechat.opens_window(wechat.parse_xml(text_xml("hi")))


# --- rendering ---------------------------------------------------------------------------------------


def test_passive_reply_survives_cdata_terminators_and_control_characters() -> None:
    content = "答案 ]]> <b>not markup</b> & \x07bell"
    xml = wechat.passive_text_xml(openid=OPENID, account=ACCOUNT, content=content, create_time=1)
    fields = xmltodict.parse(xml)["xml"]
    assert fields["Content"] == "答案 ]]> <b>not markup</b> & bell"
    assert fields["ToUserName"] == OPENID and fields["FromUserName"] == ACCOUNT
    assert fields["MsgType"] == "text" and fields["CreateTime"] == "1"


def test_markdown_is_flattened_and_buttons_become_options() -> None:
    reply = Reply(
        key=ConversationKey(channel="wechat", chat_id=OPENID),
        text="## 退货\n**七天内**可退，详见 [说明](https://example.com/r)。\n- 第一步\n- 第二步",
        buttons=(Button(label="人工客服", value="human"),),
    )
    assert wechat.render_text(reply) == (
        "退货\n七天内可退，详见 说明 https://example.com/r。\n• 第一步\n• 第二步\n\n• 人工客服"
    )


# --- splitting ---------------------------------------------------------------------------------------


def test_split_keeps_short_text_whole() -> None:
    assert wechat.split_text("您好。请问有什么可以帮您？") == ["您好。请问有什么可以帮您？"]


def test_split_cuts_at_sentence_ends_within_the_byte_limit() -> None:
    sentence = "这是一句用来测试的中文句子。"  # 14 characters, 42 bytes
    parts = wechat.split_text(sentence * 100, limit=200)
    assert all(wechat.utf8_len(part) <= 200 for part in parts)
    assert all(part.endswith("。") for part in parts)
    assert "".join(parts) == sentence * 100
    assert len(parts) == -(-100 // (200 // 42))  # greedy: as few messages as possible


def test_split_falls_back_to_commas_then_bytes_never_breaking_a_character() -> None:
    clause = "没有句号的长句子，"
    parts = wechat.split_text(clause * 50, limit=100)
    assert all(wechat.utf8_len(p) <= 100 for p in parts)
    assert all(p.endswith("，") for p in parts[:-1])
    emoji = "😀" * 100  # 4 bytes each, no boundaries at all
    parts = wechat.split_text(emoji, limit=10)
    assert parts[0] == "😀😀" and "".join(parts) == emoji


@given(st.text(alphabet=st.sampled_from(list("ab。，. \n中文😀!?")), max_size=600), st.integers(8, 64))
def test_split_never_exceeds_the_limit_and_loses_no_words(text: str, limit: int) -> None:
    parts = wechat.split_text(text, limit=limit)
    assert all(0 < wechat.utf8_len(part) <= limit for part in parts)
    assert "".join(parts).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")


def test_fit_parts_merges_into_the_sends_left_and_says_when_it_cut() -> None:
    text = "第一句话。" * 300  # 4500 bytes: 3 messages of 2048 bytes
    assert len(wechat.fit_parts(text, max_parts=5, language="zh")) == 3
    two = wechat.fit_parts(text, max_parts=2, language="zh")
    assert len(two) == 2
    notice = fixed_text("wechat_truncated", "zh")
    assert two[-1].endswith(notice) and wechat.utf8_len(two[-1]) <= wechat.TEXT_LIMIT_BYTES
    one = wechat.fit_parts(text, max_parts=1, language="en")
    assert len(one) == 1 and one[0].endswith(fixed_text("wechat_truncated", "en"))
