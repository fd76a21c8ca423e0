"""Long polling: updates from getUpdates are answered, and an update is confirmed to Telegram (the next
offset) only once kefu's inbox holds it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiogram import Bot

from adapters.telegram import BotIdentity, make_bot
from bots.gateway import create_app
from bots.telegram import Poller
from core.inbox.memory import MemoryInbox
from core.intake import Intake
from core.llm.testing import FunctionModel
from core.messages import InboundMessage
from core.stores.memory import MemoryStore
from tests.telegram.conftest import (
    BOT_ID,
    BOT_USERNAME,
    TOKEN,
    USER_ID,
    FakeBotAPI,
    last_user_text,
    private_message,
    serve,
    telegram_settings,
    wait_until,
)


async def test_polling_answers_updates_and_confirms_them_only_after_intake(
    tmp_path: Path, fake_api: FakeBotAPI
) -> None:
    fake_api.webhook_url = "https://old.example.com/telegram/webhook"  # left over from webhook mode
    fake_api.push_update(private_message(500, "polling works?"))
    settings = telegram_settings(tmp_path, fake_api, telegram_mode="polling", telegram_webhook_secret=None)
    app = create_app(settings, model=FunctionModel(lambda r: f"Yes: {last_user_text(r)}"))
    held_when_confirmed: list[bool] = []

    async def check(offset: int | None) -> None:
        if offset == 501:  # this request confirms update 500 to Telegram
            seen = await app.state.runtime.store.get(f"seen:telegram:{BOT_ID}:500")
            held_when_confirmed.append(seen is not None)

    fake_api.on_get_updates = check
    async with serve(app):
        await wait_until(lambda: fake_api.chat_texts(USER_ID) == ["Yes: polling works?"])
        await wait_until(lambda: bool(held_when_confirmed))

    methods = [c.method for c in fake_api.calls if c.method in {"deleteWebhook", "getUpdates"}]
    assert methods[0] == "deleteWebhook"
    assert fake_api.webhook_url is None
    offsets = [c.params.get("offset") for c in fake_api.calls_to("getUpdates")]
    assert offsets[0] is None and 501 in offsets
    assert held_when_confirmed and all(held_when_confirmed)
    assert fake_api.updates == []  # confirmed, Telegram forgets it


class FlakyInbox(MemoryInbox):
    """An inbox that is down for its first ``failures`` puts (Redis restarting, say)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def put(self, message: InboundMessage) -> str:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("inbox down")
        return await super().put(message)


def poller(bot: Bot, inbox: MemoryInbox) -> Poller:
    store = MemoryStore()
    return Poller(bot=bot, intake=Intake(store=store, inbox=inbox), store=store, timeout=1, retry_delay=0.01)


IDENTITY = BotIdentity(id=BOT_ID, username=BOT_USERNAME)


async def test_an_update_the_inbox_refused_is_fetched_again_not_confirmed(fake_api: FakeBotAPI) -> None:
    fake_api.push_update(private_message(700, "first"))
    fake_api.push_update(private_message(701, "second"))
    inbox = FlakyInbox(failures=1)
    bot = make_bot(token=TOKEN, api_base=fake_api.url)
    try:
        the_poller = poller(bot, inbox)
        await the_poller.poll_once(IDENTITY)
        assert the_poller.offset is None  # nothing confirmed
        assert await inbox.depth() == 0
        await the_poller.poll_once(IDENTITY)
        assert the_poller.offset == 702
        await the_poller.poll_once(IDENTITY)  # confirms both
    finally:
        await bot.session.close()
    entries = await inbox.claim("test", count=10, block=0.1)
    assert [e.message.text for e in entries] == ["first", "second"]
    assert fake_api.updates == []


async def test_one_unreadable_update_and_api_errors_do_not_stop_the_poller(fake_api: FakeBotAPI) -> None:
    bad: dict[str, Any] = {"update_id": 800, "message": {"message_id": "not a number", "chat": "?"}}
    fake_api.push_update(bad)
    fake_api.push_update(private_message(801, "after the bad one"))
    fake_api.fail_next("getUpdates", 502, "Bad Gateway")
    fake_api.flood_next("getUpdates", retry_after=1)
    inbox = MemoryInbox()
    bot = make_bot(token=TOKEN, api_base=fake_api.url)
    try:
        the_poller = poller(bot, inbox)
        for _ in range(3):
            await the_poller.poll_once(IDENTITY)
    finally:
        await bot.session.close()
    assert [c.status for c in fake_api.calls_to("getUpdates")] == [502, 429, 200]
    assert the_poller.offset == 802
    entries = await inbox.claim("test", count=10, block=0.1)
    assert [e.message.text for e in entries] == ["after the bad one"]


async def test_only_one_process_polls_at_a_time(fake_api: FakeBotAPI) -> None:
    """Two kefu processes sharing one store: Telegram would answer 409 to a second poller."""
    store = MemoryStore()  # stands in for the Redis both processes share
    inbox = MemoryInbox()
    bots = [make_bot(token=TOKEN, api_base=fake_api.url) for _ in range(2)]
    pollers = [
        Poller(bot=bot, intake=Intake(store=store, inbox=inbox), store=store, timeout=1, retry_delay=0.01)
        for bot in bots
    ]
    tasks = [asyncio.create_task(p.run()) for p in pollers]
    try:
        fake_api.push_update(private_message(900, "one answer please"))
        await wait_until(lambda: len(fake_api.calls_to("getUpdates")) >= 4)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for bot in bots:
            await bot.session.close()
    assert all(call.status == 200 for call in fake_api.calls_to("getUpdates"))
    assert [e.message.text for e in await inbox.claim("test", count=10, block=0.1)] == ["one answer please"]
