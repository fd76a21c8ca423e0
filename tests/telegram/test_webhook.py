"""The webhook path end to end: Telegram's POST → gateway → inbox → worker → engine (FunctionModel)
→ the fake Bot API server, where the customer's Telegram would show the answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bots import telegram as telegram_route
from core.llm.base import ChatChunk, ChatRequest
from core.llm.testing import FunctionModel
from core.texts import text as fixed_text
from tests.telegram.conftest import (
    GROUP_ID,
    SECRET,
    USER_ID,
    FakeBotAPI,
    Gateway,
    gateway,
    group_message,
    last_user_text,
    parse_html,
    private_message,
    telegram_settings,
    utf16_len,
    wait_until,
)


def answer(request: ChatRequest) -> str:
    return f"About «{last_user_text(request)}»: **orders** ship in 2 days & cost < 5 € > 0."


@pytest.fixture
def model() -> FunctionModel:
    return FunctionModel(answer)


async def answered(
    gw: Gateway, fake: FakeBotAPI, update_id: int, text: str, *, chat_id: int = USER_ID
) -> None:
    """Send one more private message and wait for its answer: every earlier message of that chat is
    done by then (the worker answers a conversation in order)."""
    response = await gw.post(private_message(update_id, text, chat_id=chat_id))
    assert response.status_code == 200
    await wait_until(lambda: any(f"«{text}»" in t for t in fake.chat_texts(chat_id)))


async def test_a_message_is_answered_in_the_chat_with_html_escaped(
    tmp_path: Path, fake_api: FakeBotAPI, model: FunctionModel
) -> None:
    async with gateway(telegram_settings(tmp_path, fake_api), model) as gw:
        response = await gw.post(private_message(1, "When does my order ship?"))
        assert response.status_code == 200
        await wait_until(lambda: len(fake_api.sent()) == 1)

    call = fake_api.sent()[0]
    assert call.params["chat_id"] == USER_ID
    assert call.params["parse_mode"] == "HTML"
    assert call.params["text"] == (
        "About «When does my order ship?»: <b>orders</b> ship in 2 days &amp; cost &lt; 5 € &gt; 0."
    )
    assert fake_api.chat_texts(USER_ID) == [
        "About «When does my order ship?»: orders ship in 2 days & cost < 5 € > 0."
    ]
    assert "reply_parameters" not in call.params  # no quoting in a private chat
    assert fake_api.calls_to("sendChatAction")[0].params == {"chat_id": USER_ID, "action": "typing"}


async def test_forged_requests_are_refused_logged_and_never_answered(
    tmp_path: Path, fake_api: FakeBotAPI, model: FunctionModel, caplog: pytest.LogCaptureFixture
) -> None:
    async with gateway(telegram_settings(tmp_path, fake_api), model) as gw:
        with caplog.at_level(logging.WARNING, logger="bots.telegram"):
            wrong = await gw.post(private_message(1, "forged"), secret="not-the-secret")
            missing = await gw.post(private_message(2, "forged too"), secret=None)
        assert wrong.status_code == 403
        assert missing.status_code == 401
        assert "wrong secret token" in caplog.text
        assert "without the secret token" in caplog.text
        assert SECRET not in caplog.text

        await answered(gw, fake_api, 3, "real question")

    assert len(fake_api.sent()) == 1
    assert len(model.requests) == 1


async def test_an_update_delivered_three_times_is_answered_once(
    tmp_path: Path, fake_api: FakeBotAPI, model: FunctionModel
) -> None:
    async with gateway(telegram_settings(tmp_path, fake_api), model) as gw:
        update = private_message(10, "refund please")
        for _ in range(3):
            assert (await gw.post(update)).status_code == 200
        await answered(gw, fake_api, 11, "anything else?")

    texts = fake_api.chat_texts(USER_ID)
    assert len(texts) == 2
    assert sum("«refund please»" in t for t in texts) == 1


async def test_flood_control_is_waited_out_and_the_answer_sent_once(
    tmp_path: Path, fake_api: FakeBotAPI, model: FunctionModel
) -> None:
    fake_api.flood_next("sendMessage", retry_after=1)
    async with gateway(telegram_settings(tmp_path, fake_api), model) as gw:
        await gw.post(private_message(1, "hello"))
        await wait_until(lambda: len(fake_api.sent()) == 1)

    attempts = fake_api.calls_to("sendMessage")
    assert [c.status for c in attempts] == [429, 200]
    assert fake_api.chat_texts(USER_ID) == [parse_html(attempts[1].params["text"])]


async def test_a_9000_character_answer_arrives_as_three_messages(
    tmp_path: Path, fake_api: FakeBotAPI
) -> None:
    paragraph = ("Returns are free within 30 days & refunds take <5 days. " * 16).strip()
    long_answer = "\n\n".join(f"Part {i}: {paragraph}" for i in range(10))
    assert len(long_answer) > 9000
    async with gateway(telegram_settings(tmp_path, fake_api), FunctionModel(lambda _: long_answer)) as gw:
        await gw.post(private_message(1, "tell me everything about returns"))
        await wait_until(lambda: len(fake_api.chat_texts(USER_ID)) == 3)

    # the fake refuses unparsable HTML and texts over 4096 characters, as Telegram does
    assert all(call.status == 200 for call in fake_api.calls if call.method != "sendChatAction")
    texts = fake_api.chat_texts(USER_ID)
    assert all(utf16_len(t) <= 4096 for t in texts)
    assert all(t.startswith("Part ") for t in texts)
    assert " ".join(texts).split() == long_answer.split()


async def test_in_groups_only_mentions_are_answered_as_replies(
    tmp_path: Path, fake_api: FakeBotAPI, model: FunctionModel
) -> None:
    async with gateway(telegram_settings(tmp_path, fake_api), model) as gw:
        assert (await gw.post(group_message(1, "anyone up for lunch?"))).status_code == 200
        mention = group_message(2, "where is order 42?", mention=True)
        assert (await gw.post(mention)).status_code == 200
        await wait_until(lambda: len(fake_api.sent(GROUP_ID)) == 1)
        await answered(gw, fake_api, 3, "sync")  # the worker is idle afterwards

    call = fake_api.sent(GROUP_ID)[0]
    assert call.params["reply_parameters"]["message_id"] == mention["message"]["message_id"]
    assert fake_api.chat_texts(GROUP_ID) == [
        "About «where is order 42?»: orders ship in 2 days & cost < 5 € > 0."
    ]
    assert [last_user_text(r) for r in model.requests] == ["where is order 42?", "sync"]


async def test_while_getme_fails_private_chats_are_answered_and_group_updates_are_resent(
    tmp_path: Path, fake_api: FakeBotAPI, model: FunctionModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreachable getMe costs one Bot API request per retry period, not one per webhook call."""
    monkeypatch.setattr(telegram_route, "IDENTIFY_RETRY", 2.0)
    fake_api.fail_next("getMe", 502, "Bad Gateway")
    async with gateway(telegram_settings(tmp_path, fake_api), model) as gw:
        await answered(gw, fake_api, 1, "where is my parcel?")
        await answered(gw, fake_api, 2, "and the invoice?")
        # Without the bot's username a mention cannot be told apart: Telegram is asked to resend it.
        mention = group_message(3, "where is order 42?", mention=True)
        assert (await gw.post(mention)).status_code == 503
        gw.statuses.remove(503)
        assert len(fake_api.calls_to("getMe")) == 1
        await asyncio.sleep(2.1)
        assert (await gw.post(mention)).status_code == 200  # Telegram's resend, after the period
        await wait_until(lambda: len(fake_api.sent(GROUP_ID)) == 1)

    assert len(fake_api.calls_to("getMe")) == 2
    assert (
        fake_api.sent(GROUP_ID)[0].params["reply_parameters"]["message_id"]
        == mention["message"]["message_id"]
    )


async def test_start_and_help_answer_in_the_users_language_without_the_model(
    tmp_path: Path, fake_api: FakeBotAPI, model: FunctionModel
) -> None:
    async with gateway(telegram_settings(tmp_path, fake_api), model) as gw:
        await gw.post(private_message(1, "/start", language_code="zh-hans", chat_id=111))
        await gw.post(private_message(2, "/start", language_code="en-GB", chat_id=222))
        await gw.post(private_message(3, "/help", language_code="en", chat_id=222))
        await wait_until(lambda: len(fake_api.sent()) == 3)

    assert fake_api.chat_texts(111) == [fixed_text("greeting", "zh")]
    assert fake_api.chat_texts(222) == [fixed_text("greeting", "en"), fixed_text("telegram_help", "en")]
    assert model.requests == []


async def test_human_pauses_the_bot_and_photos_get_a_text_only_notice(
    tmp_path: Path, fake_api: FakeBotAPI, model: FunctionModel
) -> None:
    photo = [{"file_id": "f", "file_unique_id": "u", "width": 90, "height": 90}]
    async with gateway(telegram_settings(tmp_path, fake_api), model) as gw:
        await gw.post(private_message(1, None, photo=photo, language_code="en"))
        await gw.post(private_message(2, "/human my parcel is broken"))
        edited = private_message(3, "edited question")
        await gw.post({"update_id": 3, "edited_message": {**edited["message"], "edit_date": 1}})
        await gw.post(private_message(4, "is anyone there?"))
        for _ in range(500):  # until the worker has taken every accepted update
            if await gw.runtime.inbox.depth() == 0 and len(fake_api.chat_texts(USER_ID)) >= 2:
                break
            await asyncio.sleep(0.02)

    # /human pauses the bot: the customer is told, and the next message waits for a person.
    assert fake_api.chat_texts(USER_ID) == [
        fixed_text("telegram_text_only", "en"),
        fixed_text("handoff_waiting", "en"),
    ]
    assert model.requests == []


async def test_bad_bodies_get_4xx_and_nothing_is_sent(
    tmp_path: Path, fake_api: FakeBotAPI, model: FunctionModel
) -> None:
    async with gateway(telegram_settings(tmp_path, fake_api), model) as gw:
        assert (await gw.post(b"{not json")).status_code == 400
        assert (await gw.post(b"[1, 2]")).status_code == 400
        assert (await gw.post({"message": {"text": "no update_id"}})).status_code == 400
        assert (await gw.post(b"\xff\xfe")).status_code == 400
        big = b'{"update_id": 1, "pad": "' + b"x" * 300_000 + b'"}'
        assert (await gw.post(big)).status_code == 413
        await answered(gw, fake_api, 5, "still fine")
    assert len(fake_api.sent()) == 1


async def test_the_route_is_404_when_telegram_is_not_configured(
    tmp_path: Path, fake_api: FakeBotAPI, model: FunctionModel
) -> None:
    settings = telegram_settings(tmp_path, fake_api, telegram_token=None)
    async with gateway(settings, model) as gw:
        assert (await gw.post(private_message(1, "hi"))).status_code == 404
    assert fake_api.calls == []


class SlowStreamingModel(FunctionModel):
    """Writes its answer word by word over a few seconds, like a real model on a busy server."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        async for chunk in super().stream(request):
            if chunk.delta:
                await asyncio.sleep(0.2)
            yield chunk


async def test_a_slow_answer_is_shown_while_written_and_completed_by_edits(
    tmp_path: Path, fake_api: FakeBotAPI
) -> None:
    words = " ".join(f"word{i}" for i in range(10))
    model = SlowStreamingModel(lambda _: f"Here you go: {words} & done.")
    async with gateway(telegram_settings(tmp_path, fake_api), model) as gw:
        await gw.post(private_message(1, "stream please"))
        await wait_until(lambda: fake_api.chat_texts(USER_ID) == [f"Here you go: {words} & done."])

    assert len(fake_api.sent()) == 1  # one message, completed in place
    edits = [c for c in fake_api.calls_to("editMessageText") if c.status == 200]
    assert len(edits) >= 2
    assert parse_html(fake_api.sent()[0].params["text"]).endswith(" …")  # shown as in progress
    assert edits[-1].params["text"] == f"Here you go: {words} &amp; done."
    assert fake_api.calls_to("sendChatAction")


async def test_serve_registers_the_webhook_with_the_secret(
    tmp_path: Path, fake_api: FakeBotAPI, model: FunctionModel
) -> None:
    settings = telegram_settings(tmp_path, fake_api, public_url="https://kefu.example.com/")
    async with gateway(settings, model):
        await wait_until(lambda: fake_api.webhook_url is not None)
    call = fake_api.calls_to("setWebhook")[0]
    assert call.params["url"] == "https://kefu.example.com/telegram/webhook"
    assert call.params["secret_token"] == SECRET
    assert call.params["allowed_updates"] == ["message"]
