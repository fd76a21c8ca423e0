"""The customer-service API side against the fake WeChat server, on the in-process and the Redis store:
the shared access_token, token errors, window errors and counting, and the passive/API handoff."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from adapters import wechat
from core.messages import ConversationKey, Reply
from core.stores.base import StateStore
from core.texts import text as fixed_text
from tests.wechat.conftest import APPID, OPENID, SECRET, FakeWeChat


def make_api(store: StateStore, fake: FakeWeChat, *, secret: str = SECRET) -> wechat.WeChatApi:
    return wechat.WeChatApi(appid=APPID, secret=secret, store=store, api_base=fake.url)


def reply(text: str, *, in_reply_to: str | None = None, extras: dict[str, object] | None = None) -> Reply:
    return Reply(
        key=ConversationKey(channel="wechat", chat_id=OPENID),
        text=text,
        in_reply_to=in_reply_to,
        extras=extras or {},
    )


# --- access_token ------------------------------------------------------------------------------------


async def test_one_token_is_fetched_for_many_concurrent_callers_in_several_processes(
    store: StateStore, fake_wechat: FakeWeChat
) -> None:
    # Two WeChatApi objects on one store stand for two kefu processes.
    apis = [make_api(store, fake_wechat), make_api(store, fake_wechat)]
    await asyncio.gather(*(apis[i % 2].send_text(OPENID, f"消息{i}") for i in range(20)))
    assert fake_wechat.token_fetches == 1
    assert len(fake_wechat.sent) == 20


async def test_an_expired_token_is_renewed_once_for_twenty_concurrent_sends(
    store: StateStore, fake_wechat: FakeWeChat
) -> None:
    api = make_api(store, fake_wechat)
    await api.send_text(OPENID, "先拿到一个令牌")
    assert fake_wechat.token_fetches == 1
    fake_wechat.expire_all()  # WeChat now answers 42001 for the stored token
    await asyncio.gather(*(make_api(store, fake_wechat).send_text(OPENID, f"消息{i}") for i in range(20)))
    assert fake_wechat.token_fetches == 2  # exactly one renewal for all twenty
    assert len(fake_wechat.sent) == 21


async def test_the_token_is_renewed_before_it_expires(store: StateStore, fake_wechat: FakeWeChat) -> None:
    api = make_api(store, fake_wechat)
    await api.send_text(OPENID, "a")
    remaining = await store.ttl(api.token_key)
    # kept 5 minutes less than WeChat's 7200 s: the next caller after that renews it in time
    assert remaining is not None and 6800 < remaining <= 6900
    await make_api(store, fake_wechat).send_text(OPENID, "b")
    assert fake_wechat.token_fetches == 1
    await store.delete(api.token_key)  # what the expiry does
    await api.send_text(OPENID, "c")
    assert fake_wechat.token_fetches == 2
    assert fake_wechat.send_attempts == 3  # no call was ever refused for an old token


async def test_40001_renews_the_token_and_retries_once(store: StateStore, fake_wechat: FakeWeChat) -> None:
    api = make_api(store, fake_wechat)
    await store.set(api.token_key, "revoked-elsewhere", ttl=3600)  # e.g. another tool fetched a new one
    await api.send_text(OPENID, "你好")
    assert fake_wechat.token_fetches == 1
    assert fake_wechat.texts() == ["你好"]
    assert fake_wechat.send_attempts == 2

    # Refused again after the renewal: no endless loop, a DeliveryError naming the code.
    fake_wechat.send_errors = [40001, 40001]
    with pytest.raises(wechat.WeChatApiError) as caught:
        await api.send_text(OPENID, "再试")
    assert caught.value.errcode == 40001
    assert fake_wechat.send_attempts == 4


async def test_token_refusal_names_the_ip_whitelist(store: StateStore, fake_wechat: FakeWeChat) -> None:
    with pytest.raises(wechat.WeChatApiError, match="KEFU_WECHAT_SECRET"):
        await make_api(store, fake_wechat, secret="wrong").send_text(OPENID, "x")
    error = wechat.WeChatApi._error(
        "access_token request refused", {"errcode": 40164, "errmsg": "invalid ip"}
    )
    assert "IP whitelist" in str(error)


async def test_chinese_is_sent_as_utf8_not_json_escapes(store: StateStore, fake_wechat: FakeWeChat) -> None:
    await make_api(store, fake_wechat).send_text(OPENID, "您好，订单已发货")
    raw = fake_wechat.sent[0].raw
    assert "您好，订单已发货".encode() in raw
    assert b"\\u" not in raw
    assert json.loads(raw) == {"touser": OPENID, "msgtype": "text", "text": {"content": "您好，订单已发货"}}


async def test_unreachable_api_is_a_delivery_error(store: StateStore) -> None:
    api = wechat.WeChatApi(appid=APPID, secret=SECRET, store=store, api_base="http://127.0.0.1:9/", timeout=2)
    with pytest.raises(wechat.WeChatApiError, match="unreachable"):
        await api.send_text(OPENID, "x")


# --- the customer-service window ---------------------------------------------------------------------


async def test_window_allows_five_sends_then_refuses_locally(
    store: StateStore, fake_wechat: FakeWeChat
) -> None:
    sender = wechat.WeChatSender(api=make_api(store, fake_wechat), store=store)
    await wechat.open_window(store, OPENID)
    for i in range(5):
        await sender.send(reply(f"第{i}条"))
    with pytest.raises(wechat.WeChatApiError, match="used up"):
        await sender.send(reply("第六条"))
    assert len(fake_wechat.sent) == 5
    assert fake_wechat.send_attempts == 5  # the sixth never reached WeChat
    # the customer writes again: a new window
    await wechat.open_window(store, OPENID)
    await sender.send(reply("新窗口"))
    assert fake_wechat.texts()[-1] == "新窗口"


async def test_long_answer_uses_only_the_sends_left(store: StateStore, fake_wechat: FakeWeChat) -> None:
    sender = wechat.WeChatSender(api=make_api(store, fake_wechat), store=store)
    await wechat.open_window(store, OPENID)
    for i in range(3):
        await sender.send(reply(f"第{i}条"))
    long_text = "这是很长的答复中的一句话。" * 500  # about 19 KB
    await sender.send(reply(long_text))
    parts = fake_wechat.texts()[3:]
    assert len(parts) == 2
    assert all(len(p.encode()) <= 2048 for p in parts)
    assert parts[-1].endswith(fixed_text("wechat_truncated", "zh"))


@pytest.mark.parametrize(
    ("errcode", "hint"), [(45015, "more than 48 h ago"), (45047, "5 messages were already sent")]
)
async def test_window_errors_are_delivery_errors_with_a_clear_log(
    store: StateStore, fake_wechat: FakeWeChat, caplog: pytest.LogCaptureFixture, errcode: int, hint: str
) -> None:
    sender = wechat.WeChatSender(api=make_api(store, fake_wechat), store=store)
    await wechat.open_window(store, OPENID)
    fake_wechat.send_errors = [errcode]
    with (
        caplog.at_level(logging.WARNING, logger="adapters.wechat"),
        pytest.raises(wechat.WeChatApiError) as caught,
    ):
        await sender.send(reply("答复"))
    assert caught.value.errcode == errcode
    assert f"errcode {errcode}" in caplog.text and hint in caplog.text
    if errcode == 45047:
        # remembered: the next answer is not even tried until the customer writes again
        with pytest.raises(wechat.WeChatApiError, match="used up"):
            await sender.send(reply("再来一条"))
        assert fake_wechat.send_attempts == 1
    else:
        # the window is closed: forgotten until the customer writes again
        assert await store.get(wechat.window_key(OPENID)) is None


# --- passive reply or API: exactly one ---------------------------------------------------------------


async def test_handoff_answer_ready_in_time_goes_passively(store: StateStore) -> None:
    handoff = wechat.Handoff(store, poll=0.01)
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(handoff.wait_passive("m1", deadline=loop.time() + 2))
    await asyncio.sleep(0.05)
    await handoff.publish("m1", "答复")
    decided = await handoff.settle("m1", not_after=time.time() + 3)
    assert await waiting == "答复"
    assert decided == wechat.Handoff.PASSIVE


async def test_handoff_answer_after_the_deadline_goes_through_the_api(store: StateStore) -> None:
    handoff = wechat.Handoff(store, poll=0.01)
    loop = asyncio.get_running_loop()
    assert await handoff.wait_passive("m2", deadline=loop.time() + 0.1) is None
    await handoff.publish("m2", "迟到的答复")
    assert await handoff.settle("m2", not_after=time.time() + 5) == wechat.Handoff.API


async def test_handoff_when_the_webhook_died_the_sender_takes_over(store: StateStore) -> None:
    handoff = wechat.Handoff(store, poll=0.01)
    await handoff.publish("m3", "答复")
    assert await handoff.settle("m3", not_after=time.time() + 0.1) == wechat.Handoff.API
    # a retry arriving later does not answer again
    loop = asyncio.get_running_loop()
    assert await handoff.wait_passive("m3", deadline=loop.time() + 1) is None


async def test_handoff_several_waiting_requests_one_answer(store: StateStore) -> None:
    handoff = wechat.Handoff(store, poll=0.01)
    loop = asyncio.get_running_loop()
    waiters = [asyncio.create_task(handoff.wait_passive("m4", deadline=loop.time() + 2)) for _ in range(3)]
    await asyncio.sleep(0.05)
    await handoff.publish("m4", "答复")
    decided = await handoff.settle("m4", not_after=time.time() + 3)
    results = await asyncio.gather(*waiters)
    assert sorted(results, key=lambda r: r is None) == ["答复", None, None]
    assert decided == wechat.Handoff.PASSIVE


async def test_handoff_long_answer_is_never_passive(store: StateStore) -> None:
    handoff = wechat.Handoff(store, poll=0.01)
    await handoff.publish("m5", "长" * 1000)  # 3000 bytes: more than one message
    loop = asyncio.get_running_loop()
    assert await handoff.wait_passive("m5", deadline=loop.time() + 1) is None
    assert await handoff.settle("m5", not_after=time.time() + 1) == wechat.Handoff.API


async def test_sender_delivers_an_answer_through_the_api_at_most_once(
    store: StateStore, fake_wechat: FakeWeChat
) -> None:
    sender = wechat.WeChatSender(api=make_api(store, fake_wechat), store=store, handoff_margin=0.05)
    await wechat.open_window(store, OPENID)
    answer = reply("答复", in_reply_to="m6", extras={"passive_until": time.time()})
    await sender.send(answer)
    await sender.send(answer)  # the worker processing the same message again
    assert fake_wechat.texts() == ["答复"]
