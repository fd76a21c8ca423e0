"""The reply sender on its own against the fake Bot API: what the customer's chat shows when an answer
fails half-way through being written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from adapters import telegram as adapter
from adapters.telegram_update import Update
from core.errors import DatabaseError
from core.messages import InboundMessage, Reply, ReplyDelta, ReplyDone, ReplyEvent, ReplySource
from tests.telegram.conftest import TOKEN, USER_ID, FakeBotAPI, private_message


def inbound(update_id: int, text: str) -> InboundMessage:
    message = adapter.to_inbound(
        Update.model_validate(private_message(update_id, text)), bot=adapter.BotIdentity(id=1)
    )
    assert message is not None
    return message


async def written_slowly(message: InboundMessage, words: int, *, fail: bool) -> AsyncIterator[ReplyEvent]:
    for n in range(words):
        yield ReplyDelta(text=f"word{n} ")
        await asyncio.sleep(0.05)
    if fail:
        raise DatabaseError("database unavailable while answering (ConnectionRefusedError)")
    text = " ".join(f"word{n}" for n in range(words))
    yield ReplyDone(reply=Reply(key=message.key, text=text, language="en", source=ReplySource.MODEL))


@pytest.fixture
async def sender(fake_api: FakeBotAPI) -> AsyncIterator[adapter.TelegramSender]:
    bot = adapter.make_bot(token=TOKEN, api_base=fake_api.url)
    sender = adapter.TelegramSender(bot=bot, stream_after=0.0, stream_interval=0.0, chat_interval=0.0)
    yield sender
    await sender.aclose()


async def test_a_half_written_answer_is_deleted_when_it_fails(
    fake_api: FakeBotAPI, sender: adapter.TelegramSender
) -> None:
    message = inbound(1, "where is my parcel?")
    with pytest.raises(DatabaseError):
        await sender.deliver(message, written_slowly(message, 6, fail=True))
    assert fake_api.sent(USER_ID)  # the customer saw it being written...
    assert fake_api.chat_texts(USER_ID) == []  # ...and it is gone, so the retry's answer stands alone

    # The entry is answered again after the outage: one message, the whole answer.
    await sender.deliver(message, written_slowly(message, 6, fail=False))
    assert fake_api.chat_texts(USER_ID) == ["word0 word1 word2 word3 word4 word5"]


async def test_the_failure_still_reaches_the_worker_when_the_draft_cannot_be_deleted(
    fake_api: FakeBotAPI, sender: adapter.TelegramSender
) -> None:
    fake_api.fail_next("deleteMessage", 400, "Bad Request: message can't be deleted for everyone")
    message = inbound(2, "and my invoice?")
    with pytest.raises(DatabaseError):
        await sender.deliver(message, written_slowly(message, 4, fail=True))
    assert len(fake_api.calls_to("deleteMessage")) == 1
