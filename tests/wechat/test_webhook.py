"""The /wechat webhook end to end: signed (and encrypted) requests from "WeChat" through the gateway,
the worker and the engine to the passive reply or the fake customer-service API."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import xmltodict

from core.errors import ConfigError
from core.llm.testing import FunctionModel
from core.messages import ConversationKey
from core.texts import text as fixed_text
from tests.wechat.conftest import (
    AES_KEY,
    OLD_AES_KEY,
    OPENID,
    OTHER_AES_KEY,
    SLOW,
    FakeWeChat,
    SlowStreamModel,
    answer_for,
    decrypt_response,
    encrypted_request,
    event_xml,
    fast_model,
    gateway,
    message_xml,
    reply_content,
    signed_query,
    slow_model,
    text_xml,
    wait_for,
    wechat_settings,
)

# --- URL verification and authenticity ------------------------------------------------------------------


async def test_url_verification_echoes_echostr(tmp_path: Path, fake_wechat: FakeWeChat) -> None:
    async with gateway(wechat_settings(tmp_path, fake_wechat), fast_model()) as gw:
        response = await gw.get(signed_query(echostr="7284920193847"))
        assert response.status_code == 200
        assert response.text == "7284920193847"

        forged = signed_query(echostr="1")
        forged["signature"] = "0" * 40
        assert (await gw.get(forged)).status_code == 403
        stale = signed_query(timestamp=int(time.time()) - 600, echostr="1")
        assert (await gw.get(stale)).status_code == 403
        wrong_token = signed_query(token="not-our-token", echostr="1")
        assert (await gw.get(wrong_token)).status_code == 403


async def test_forged_or_stale_requests_are_refused_and_nothing_is_processed(
    tmp_path: Path, fake_wechat: FakeWeChat, caplog: pytest.LogCaptureFixture
) -> None:
    model = fast_model()
    async with gateway(wechat_settings(tmp_path, fake_wechat), model) as gw:
        forged = signed_query()
        forged["signature"] = forged["signature"][::-1]
        missing = {k: v for k, v in signed_query().items() if k != "signature"}
        stale = signed_query(timestamp=int(time.time()) - 301)
        future = signed_query(timestamp=int(time.time()) + 400)
        with caplog.at_level(logging.WARNING, logger="bots.wechat"):
            for query in (forged, missing, stale, future):
                response = await gw.post(text_xml("hello", msg_id=str(len(query))), query)
                assert response.status_code == 403
            # checked before the body is even read: broken or huge bodies of forged requests are 403 too
            assert (await gw.post("<xml><broken", forged)).status_code == 403
            assert (await gw.post("x" * (100 * 1024), forged)).status_code == 403
        assert "signature does not match" in caplog.text
        assert "check the clock" in caplog.text
        await gw.settled()
        assert model.requests == []
        assert fake_wechat.sent == [] and fake_wechat.token_fetches == 0


async def test_forged_msg_signature_in_safe_mode_is_refused(tmp_path: Path, fake_wechat: FakeWeChat) -> None:
    model = fast_model()
    settings = wechat_settings(tmp_path, fake_wechat, wechat_aes_key=AES_KEY)
    async with gateway(settings, model) as gw:
        query, body = encrypted_request(text_xml("hello"))
        query["msg_signature"] = "f" * 40
        assert (await gw.post(body, query)).status_code == 403
        # a valid msg_signature but a forged URL signature is refused before the body is looked at
        query, body = encrypted_request(text_xml("hello"))
        query["signature"] = "0" * 40
        assert (await gw.post(body, query)).status_code == 403
        await gw.settled()
        assert model.requests == []


async def test_routes_answer_404_while_wechat_is_not_configured(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    settings = wechat_settings(tmp_path, fake_wechat, wechat_secret=None)
    async with gateway(settings, fast_model()) as gw:
        assert (await gw.get(signed_query(echostr="1"))).status_code == 404
        assert (await gw.post(text_xml("hello"))).status_code == 404


def test_a_malformed_encoding_aes_key_stops_the_start_up(tmp_path: Path, fake_wechat: FakeWeChat) -> None:
    from bots.wechat import safe_mode

    with pytest.raises(ConfigError, match="KEFU_WECHAT_AES_KEY"):
        safe_mode(wechat_settings(tmp_path, fake_wechat, wechat_aes_key="too-short"))


# --- malformed and oversized bodies ------------------------------------------------------------------


async def test_malformed_and_oversized_bodies_get_4xx_never_5xx(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    model = fast_model()
    settings = wechat_settings(tmp_path, fake_wechat, wechat_aes_key=AES_KEY)
    async with gateway(settings, model) as gw:
        bad_bodies = [
            "<xml><Content>unterminated",
            "not xml at all",
            "",
            "<other><MsgType>text</MsgType></other>",
            "<xml><MsgType>text</MsgType><Content>no sender</Content></xml>",
            '<!DOCTYPE xml [<!ENTITY lol "lol">]><xml><FromUserName>&lol;</FromUserName></xml>',
            b"<xml><Content>\xff\xfe broken utf-8</Content></xml>",
        ]
        for body in bad_bodies:
            response = await gw.post(body)
            assert response.status_code == 400, body

        big = text_xml("x" * (64 * 1024 + 1))
        assert (await gw.post(big)).status_code == 413

        # safe mode: an envelope without <Encrypt>, and one encrypted with a key we do not hold
        assert (
            await gw.post("<xml><ToUserName>x</ToUserName></xml>", signed_query(encrypt_type="aes"))
        ).status_code == 400
        query, body = encrypted_request(text_xml("hi"), aes_key=OTHER_AES_KEY)
        assert (await gw.post(body, query)).status_code == 400
        # signed, decrypts, but the inner XML is broken
        query, body = encrypted_request("<xml><MsgType>text")
        assert (await gw.post(body, query)).status_code == 400

        await gw.settled()
        assert model.requests == []
        # the gateway is still fine afterwards
        response = await gw.post(text_xml("还在吗"))
        assert reply_content(response.text) == answer_for("还在吗")


# --- the 5-second rule -------------------------------------------------------------------------------


async def test_fast_answer_comes_back_in_the_http_response(tmp_path: Path, fake_wechat: FakeWeChat) -> None:
    async with gateway(wechat_settings(tmp_path, fake_wechat), fast_model()) as gw:
        response = await gw.post(text_xml("我的订单到哪了？"))
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/xml")
        fields = xmltodict.parse(response.text)["xml"]
        assert fields["ToUserName"] == OPENID
        assert fields["FromUserName"] == "gh_0123456789ab"
        assert fields["MsgType"] == "text"
        assert fields["Content"] == answer_for("我的订单到哪了？")
        await gw.settled()
        # answered once: nothing went through the customer-service API
        assert fake_wechat.sent == []
        # the conversation is keyed by the customer's openid and holds the turn
        conversations = gw.server.runtime.conversations
        conversation = await conversations.get(ConversationKey(channel="wechat", chat_id=OPENID))
        assert conversation is not None and conversation.id is not None
        rows = await conversations.messages(conversation.id)
        assert [(m.role, m.content) for m in rows] == [
            ("user", "我的订单到哪了？"),
            ("assistant", answer_for("我的订单到哪了？")),
        ]
        assert rows[0].platform_message_id == "1000001"


async def test_safe_mode_reply_is_encrypted_and_decrypts_to_the_answer(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    settings = wechat_settings(tmp_path, fake_wechat, wechat_aes_key=AES_KEY)
    async with gateway(settings, fast_model()) as gw:
        query, body = encrypted_request(text_xml("退货怎么办理"))
        response = await gw.post(body, query)
        assert response.status_code == 200
        assert "退货" not in response.text  # not in clear
        fields = decrypt_response(response.text)
        assert fields["Content"] == answer_for("退货怎么办理")
        assert fields["ToUserName"] == OPENID


async def test_slow_answer_gets_success_at_once_then_one_customer_service_message(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    async with gateway(wechat_settings(tmp_path, fake_wechat, **SLOW), slow_model(1.2)) as gw:
        response = await gw.post(text_xml("发票怎么开"))
        assert response.status_code == 200
        assert response.text == "success"
        assert fake_wechat.sent == []  # the answer was not ready when WeChat was answered
        await wait_for(lambda: len(fake_wechat.sent) == 1)
        await gw.settled()
        assert [(s.touser, s.content) for s in fake_wechat.sent] == [(OPENID, answer_for("发票怎么开"))]


async def test_typing_is_shown_while_a_slow_answer_is_being_written(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    async with gateway(wechat_settings(tmp_path, fake_wechat, **SLOW), SlowStreamModel(1.5)) as gw:
        assert (await gw.post(text_xml("发票怎么开"))).text == "success"
        await wait_for(lambda: len(fake_wechat.sent) == 1)
        await gw.settled()
        assert fake_wechat.typing and fake_wechat.typing[0] == {"touser": OPENID, "command": "Typing"}
        assert fake_wechat.texts() == [answer_for("发票怎么开")]


async def test_slow_answer_in_safe_mode_also_goes_through_the_api(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    settings = wechat_settings(tmp_path, fake_wechat, wechat_aes_key=AES_KEY, **SLOW)
    async with gateway(settings, slow_model(1.0)) as gw:
        query, body = encrypted_request(text_xml("慢一点的问题"))
        response = await gw.post(body, query)
        assert response.text == "success"
        await wait_for(lambda: len(fake_wechat.sent) == 1)
        await gw.settled()
        assert fake_wechat.texts() == [answer_for("慢一点的问题")]


# --- WeChat's retries: exactly one answer ------------------------------------------------------------


async def test_retries_of_a_slow_message_produce_exactly_one_answer(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    model = slow_model(1.5)
    async with gateway(wechat_settings(tmp_path, fake_wechat, **SLOW), model) as gw:
        xml = text_xml("运费多少", msg_id="555")
        first = asyncio.create_task(gw.post(xml))
        await asyncio.sleep(0.2)
        second = await gw.post(xml)  # arrives while the first is still waiting
        responses = [await first, second, await gw.post(xml)]  # and one after the first gave up
        await wait_for(lambda: len(fake_wechat.sent) >= 1)
        await gw.settled()
        await asyncio.sleep(0.3)  # room for a (wrong) second delivery to show up
        passive = [r for r in responses if reply_content(r.text) is not None]
        assert all(r.status_code == 200 for r in responses)
        assert len(passive) + len(fake_wechat.sent) == 1
        assert fake_wechat.texts() == [answer_for("运费多少")]
        assert len(model.requests) == 1


async def test_concurrent_retries_while_the_answer_is_being_written_get_one_passive_reply(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    model = slow_model(0.25)  # ready well before the 2 s deadline
    async with gateway(wechat_settings(tmp_path, fake_wechat), model) as gw:
        xml = text_xml("营业时间", msg_id="777")
        responses = await asyncio.gather(*(gw.post(xml) for _ in range(3)))
        await gw.settled()
        contents = [reply_content(r.text) for r in responses]
        assert sorted(contents, key=lambda c: c is None) == [answer_for("营业时间"), None, None]
        assert fake_wechat.sent == []
        assert len(model.requests) == 1
        # a late retry of the answered message does not answer again
        late = await gw.post(xml)
        assert late.text == "success"
        await gw.settled()
        assert fake_wechat.sent == []


async def test_a_retried_message_answered_fast_is_not_answered_again(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    model = fast_model()
    async with gateway(wechat_settings(tmp_path, fake_wechat), model) as gw:
        xml = text_xml("你好", msg_id="42")
        first = await gw.post(xml)
        assert reply_content(first.text) == answer_for("你好")
        for _ in range(3):
            assert (await gw.post(xml)).text == "success"
        await gw.settled()
        assert fake_wechat.sent == []
        assert len(model.requests) == 1


# --- message kinds ---------------------------------------------------------------------------------


async def test_voice_is_answered_from_its_recognition_text(tmp_path: Path, fake_wechat: FakeWeChat) -> None:
    model = fast_model()
    async with gateway(wechat_settings(tmp_path, fake_wechat), model) as gw:
        voice = message_xml("voice", MediaId="m1", Format="amr", Recognition="我想查快递", MsgId="9001")
        response = await gw.post(voice)
        assert reply_content(response.text) == answer_for("我想查快递")

        unrecognised = message_xml("voice", MediaId="m2", Format="amr", MsgId="9002")
        response = await gw.post(unrecognised)
        assert reply_content(response.text) == fixed_text("wechat_voice_unrecognized", "zh")
        await gw.settled()
        assert len(model.requests) == 1


async def test_an_image_is_acknowledged_without_the_model(tmp_path: Path, fake_wechat: FakeWeChat) -> None:
    model = fast_model()
    async with gateway(wechat_settings(tmp_path, fake_wechat), model) as gw:
        image = message_xml("image", PicUrl="http://example.com/p.jpg", MediaId="m3", MsgId="9003")
        response = await gw.post(image)
        content = reply_content(response.text)
        assert content == fixed_text("wechat_image_received", "zh")
        assert content is not None and content.startswith("已收到图片")
        await gw.settled()
        assert model.requests == []


async def test_followers_are_greeted_and_unfollows_ignored(tmp_path: Path, fake_wechat: FakeWeChat) -> None:
    model = fast_model()
    async with gateway(wechat_settings(tmp_path, fake_wechat), model) as gw:
        response = await gw.post(event_xml("subscribe"))
        assert reply_content(response.text) == fixed_text("greeting", "zh")
        # subscribing through a QR code with a scene is still a new follower
        response = await gw.post(event_xml("subscribe", create_time=1_700_000_005, EventKey="qrscene_123"))
        assert reply_content(response.text) == fixed_text("greeting", "zh")
        response = await gw.post(event_xml("unsubscribe", create_time=1_700_000_010))
        assert response.text == "success"
        response = await gw.post(event_xml("VIEW", create_time=1_700_000_011, EventKey="https://example.com"))
        assert response.text == "success"
        await gw.settled()
        assert model.requests == [] and fake_wechat.sent == []


async def test_menu_click_is_answered_with_its_event_key_and_deduped(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    model = fast_model()
    async with gateway(wechat_settings(tmp_path, fake_wechat), model) as gw:
        click = event_xml("CLICK", EventKey="MENU_ORDER_STATUS")
        first = await gw.post(click)
        assert reply_content(first.text) == answer_for("MENU_ORDER_STATUS")
        assert (await gw.post(click)).text == "success"  # WeChat's retry of the same event
        await gw.settled()
        assert len(model.requests) == 1


async def test_a_blank_text_gets_the_chinese_prompt_for_a_question(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    # Nothing to detect a language from: WeChat customers are answered in Chinese by default.
    async with gateway(wechat_settings(tmp_path, fake_wechat), fast_model()) as gw:
        response = await gw.post(text_xml("   ", msg_id="31"))
        assert reply_content(response.text) == fixed_text("empty_input", "zh")


# --- delivery failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("errcode", [45015, 45047])
async def test_window_errors_are_logged_and_the_gateway_keeps_working(
    tmp_path: Path, fake_wechat: FakeWeChat, caplog: pytest.LogCaptureFixture, errcode: int
) -> None:
    fake_wechat.send_errors = [errcode]
    async with gateway(wechat_settings(tmp_path, fake_wechat, **SLOW), slow_model(0.8)) as gw:
        with caplog.at_level(logging.WARNING):
            assert (await gw.post(text_xml("第一个问题", msg_id="1"))).text == "success"
            await wait_for(lambda: fake_wechat.send_attempts >= 1)
            await wait_for(lambda: f"errcode {errcode}" in caplog.text)
        assert "customer-service window" in caplog.text
        assert any(r.exc_info and type(r.exc_info[1]).__name__ == "WeChatApiError" for r in caplog.records)
        assert fake_wechat.sent == []
        # the next customer message opens a new window and is answered
        assert (await gw.post(text_xml("第二个问题", msg_id="2"))).text == "success"
        await wait_for(lambda: len(fake_wechat.sent) == 1)
        assert fake_wechat.texts() == [answer_for("第二个问题")]


async def test_long_slow_answer_is_split_within_the_window(tmp_path: Path, fake_wechat: FakeWeChat) -> None:
    sentence = "这是一个比较长的句子，用来测试微信消息的分段发送功能。"
    long_answer = sentence * 150  # about 12 KB of UTF-8: 6 messages' worth
    model = FunctionModel(lambda request: long_answer, delay=0.7)
    async with gateway(wechat_settings(tmp_path, fake_wechat, **SLOW), model) as gw:
        assert (await gw.post(text_xml("长问题", msg_id="77"))).text == "success"
        await wait_for(lambda: len(fake_wechat.sent) == 5)
        await gw.settled()
        await asyncio.sleep(0.2)
        parts = fake_wechat.texts()
        assert len(parts) == 5  # never more than the 5 sends a customer message allows
        assert all(len(part.encode()) <= 2048 for part in parts)
        assert all(part.endswith("。") for part in parts[:-1])  # cut at sentence ends
        assert parts[-1].endswith(fixed_text("wechat_truncated", "zh"))
        assert "".join(parts[:-1]) == long_answer[: len("".join(parts[:-1]))]


async def test_a_long_answer_ready_in_time_still_goes_out_in_parts(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    long_answer = "第一段内容。" * 400  # 7.2 KB: too long for the single passive reply
    model = FunctionModel(lambda request: long_answer)
    async with gateway(wechat_settings(tmp_path, fake_wechat), model) as gw:
        assert (await gw.post(text_xml("长问题", msg_id="78"))).text == "success"
        await wait_for(lambda: len(fake_wechat.sent) == 4)
        await gw.settled()
        assert "".join(fake_wechat.texts()) == long_answer
        assert all(len(part.encode()) <= 2048 for part in fake_wechat.texts())


async def test_old_encoding_aes_key_still_decrypts_after_rotation(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    settings = wechat_settings(
        tmp_path, fake_wechat, wechat_aes_key=AES_KEY, wechat_aes_key_previous=OLD_AES_KEY
    )
    async with gateway(settings, fast_model()) as gw:
        query, body = encrypted_request(text_xml("旧密钥消息", msg_id="1"), aes_key=OLD_AES_KEY)
        response = await gw.post(body, query)
        assert response.status_code == 200
        # the reply uses the key WeChat used for the request
        assert decrypt_response(response.text, aes_key=OLD_AES_KEY)["Content"] == answer_for("旧密钥消息")

        query, body = encrypted_request(text_xml("新密钥消息", msg_id="2"), aes_key=AES_KEY)
        response = await gw.post(body, query)
        assert decrypt_response(response.text, aes_key=AES_KEY)["Content"] == answer_for("新密钥消息")

        query, body = encrypted_request(text_xml("陌生密钥", msg_id="3"), aes_key=OTHER_AES_KEY)
        assert (await gw.post(body, query)).status_code == 400


async def test_api_calls_never_use_the_synchronous_wechatpy_client(
    tmp_path: Path, fake_wechat: FakeWeChat
) -> None:
    async with gateway(wechat_settings(tmp_path, fake_wechat, **SLOW), slow_model(0.8)) as gw:
        await gw.post(text_xml("你好", msg_id="5"))
        await wait_for(lambda: len(fake_wechat.sent) == 1)
        await gw.settled()
    assert fake_wechat.user_agents
    # wechatpy's client is requests-based (blocking); every call came from the async httpx client
    assert all(agent.startswith("python-httpx/") for agent in fake_wechat.user_agents)
