"""Which Telegram updates the bot answers, and how they become conversation messages."""

from __future__ import annotations

from typing import Any

from adapters.telegram import BotIdentity, fixed_answer, to_inbound
from adapters.telegram_update import Update
from core.messages import ConversationKey, InboundMessage
from tests.telegram.conftest import BOT_ID, BOT_USERNAME, GROUP_ID, USER_ID, group_message, private_message

BOT = BotIdentity(id=BOT_ID, username=BOT_USERNAME)


def inbound(update: dict[str, Any]) -> InboundMessage | None:
    return to_inbound(Update.model_validate(update), bot=BOT)


def test_a_private_message_is_one_conversation_per_chat_deduped_per_update() -> None:
    message = inbound(private_message(31, "Where is my order?"))
    assert message is not None
    assert message.key == ConversationKey(channel="telegram", chat_id=str(USER_ID))
    assert message.user_id == str(USER_ID)
    assert message.message_id == f"{BOT_ID}:31"
    assert message.text == "Where is my order?"
    assert message.user_name == "Ada"
    assert "reply_to" not in message.extras  # private answers do not quote the question


def test_language_follows_the_text_then_the_telegram_client_language() -> None:
    def language(text: str, code: str | None) -> str | None:
        message = inbound(private_message(1, text, language_code=code))
        return message.language if message else None

    assert language("hello", "zh-hans") == "zh"
    assert language("/start", "zh-hant") == "zh"
    assert language("我的订单在哪", "en") == "zh"
    assert language("hello", "en") == "en"
    assert language("hello", "de") == "en"
    assert language("12345", None) == "en"


def test_group_chatter_is_not_answered_but_mentions_and_replies_to_the_bot_are() -> None:
    assert inbound(group_message(1, "lunch anyone?")) is None

    mentioned = inbound(group_message(2, "where is my order?", mention=True))
    assert mentioned is not None
    assert mentioned.text == "where is my order?"
    assert mentioned.key.chat_id == str(GROUP_ID)
    assert mentioned.extras["reply_to"] == mentioned.extras["message_id"]

    bot_message = {
        "message_id": 1,
        "date": 0,
        "chat": {"id": GROUP_ID, "type": "supergroup"},
        "from": {"id": BOT_ID, "is_bot": True, "first_name": "Kefu"},
        "text": "Hi",
    }
    reply = inbound(group_message(3, "thanks, and the invoice?", reply_to_message=bot_message))
    assert reply is not None and reply.text == "thanks, and the invoice?"

    other = {**bot_message, "from": {"id": 99, "is_bot": False, "first_name": "Bob"}}
    assert inbound(group_message(4, "agreed", reply_to_message=other)) is None


def test_commands_in_groups_count_only_when_they_are_for_this_bot() -> None:
    help_cmd = inbound(group_message(1, f"/help@{BOT_USERNAME}"))
    assert help_cmd is not None and help_cmd.extras["command"] == "help"
    bare = inbound(group_message(2, "/start"))
    assert bare is not None and bare.extras["command"] == "start"
    assert inbound(group_message(3, "/start@some_other_bot")) is None


def test_commands_map_to_fixed_texts_or_to_the_core() -> None:
    start = inbound(private_message(1, "/start"))
    help_ = inbound(private_message(2, "/help"))
    human = inbound(private_message(3, "/human my parcel is broken"))
    assert start is not None and help_ is not None and human is not None
    assert fixed_answer(start) == "greeting"
    assert fixed_answer(help_) == "telegram_help"
    assert human.extras["command"] == "human"
    assert fixed_answer(human) is None  # goes to the engine
    assert human.text == "/human my parcel is broken"


def test_forum_topics_are_separate_conversations() -> None:
    message = inbound(group_message(1, "hi", mention=True, message_thread_id=77, is_topic_message=True))
    assert message is not None
    assert message.key == ConversationKey(channel="telegram", chat_id=str(GROUP_ID), thread_id="77")
    # a reply thread in a non-forum group is not a topic
    plain = inbound(group_message(2, "hi", mention=True, message_thread_id=55))
    assert plain is not None and plain.key.thread_id is None


def test_media_get_a_text_only_notice() -> None:
    photo = [{"file_id": "f", "file_unique_id": "u", "width": 90, "height": 90}]
    message = inbound(private_message(1, None, photo=photo, caption="is this broken?"))
    assert message is not None
    assert message.extras["media"] == "photo"
    assert fixed_answer(message) == "telegram_text_only"
    sticker = {
        "file_id": "s",
        "file_unique_id": "v",
        "type": "regular",
        "width": 512,
        "height": 512,
        "is_animated": False,
        "is_video": False,
    }
    assert fixed_answer(inbound(private_message(2, None, sticker=sticker)) or message) == "telegram_text_only"


def test_edits_channel_posts_bots_and_service_messages_are_not_answered() -> None:
    base = private_message(1, "hello")
    assert inbound({"update_id": 2, "edited_message": {**base["message"], "edit_date": 1}}) is None
    channel_post = {"message_id": 1, "date": 0, "chat": {"id": -100777, "type": "channel"}, "text": "news"}
    assert inbound({"update_id": 3, "channel_post": channel_post}) is None
    from_bot = private_message(4, "hello")
    from_bot["message"]["from"]["is_bot"] = True
    assert inbound(from_bot) is None
    joined = group_message(5, "x")
    del joined["message"]["text"]
    joined["message"]["new_chat_members"] = [{"id": 5, "is_bot": False, "first_name": "Eve"}]
    assert inbound(joined) is None
