"""Hand-off through the Telegram adapter against the fake Bot API server.

The customer's ``/human`` gets the waiting notice; while a person has the conversation the bot is
silent; the agent's replies from the console API arrive in the chat; handed back, the bot answers again.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from core.handoff import expire_handoffs
from core.messages import ConversationKey
from core.texts import text as fixed_text
from tests.handoff.conftest import ADMIN_TOKEN, BEARER, RecordingModel, eventually
from tests.telegram.conftest import USER_ID, FakeBotAPI, Gateway, gateway, private_message, telegram_settings

KEY = ConversationKey(channel="telegram", chat_id=str(USER_ID))


async def _idle(gw: Gateway) -> None:
    await eventually(lambda: _inbox_empty(gw))


async def _inbox_empty(gw: Gateway) -> bool:
    return await gw.runtime.inbox.depth() == 0


async def _conversation_id(gw: Gateway) -> int:
    conversation = await gw.runtime.conversations.get(KEY)
    assert conversation is not None and conversation.id is not None
    return conversation.id


async def _state(gw: Gateway) -> str:
    conversation = await gw.runtime.conversations.get(KEY)
    assert conversation is not None
    return conversation.state


async def test_human_command_agent_reply_and_return_to_bot(tmp_path: Path, fake_api: FakeBotAPI) -> None:
    model = RecordingModel()
    settings = telegram_settings(tmp_path, fake_api, admin_token=ADMIN_TOKEN)
    async with gateway(settings, model) as gw:
        # 1. The customer asks for a person: the waiting notice, no model call.
        await gw.post(private_message(1, "/human"))
        await fake_api_wait(fake_api, 1)
        assert fake_api.chat_texts(USER_ID) == [fixed_text("handoff_waiting", "en")]
        assert model.asked == []
        assert await _state(gw) == "waiting"
        conversation_id = await _conversation_id(gw)

        # 2. The waiting conversation is in the console's list, with the customer's last message.
        listed = (await gw.client.get("/admin/api/conversations?state=waiting", headers=BEARER)).json()
        assert [row["id"] for row in listed] == [conversation_id]

        # 3. While waiting, the bot stays silent; the message is kept for the agent.
        await gw.post(private_message(2, "hello? anyone there?"))
        await _idle(gw)
        assert len(fake_api.sent(USER_ID)) == 1
        assert model.asked == []

        # 4. An agent takes over and replies through the console API: both arrive in the chat.
        taken = await gw.client.post(f"/admin/api/conversations/{conversation_id}/takeover", headers=BEARER)
        assert taken.status_code == 200 and taken.json()["changed"] is True
        reply = await gw.client.post(
            f"/admin/api/conversations/{conversation_id}/reply",
            headers={**BEARER, "X-Kefu-Agent": "Mei"},
            json={"text": "Hi, this is Mei from support. Let me check your order."},
        )
        assert reply.status_code == 201, reply.text
        assert fake_api.chat_texts(USER_ID)[1:] == [
            fixed_text("handoff_agent_joined", "en"),
            "Hi, this is Mei from support. Let me check your order.",
        ]

        # 5. Still with the agent: the customer's next message gets no bot answer.
        await gw.post(private_message(3, "thanks, it is order KF20251103001"))
        await _idle(gw)
        assert len(fake_api.sent(USER_ID)) == 3
        assert model.asked == []

        # The transcript keeps everything, the agent's words as role "agent".
        detail = (await gw.client.get(f"/admin/api/conversations/{conversation_id}", headers=BEARER)).json()
        roles = [(m["role"], m["content"]) for m in detail["messages"]]
        assert ("user", "hello? anyone there?") in roles
        assert ("agent", "Hi, this is Mei from support. Let me check your order.") in roles
        assert roles[-1] == ("user", "thanks, it is order KF20251103001")

        # 6. Back to the bot: the customer is told, and the bot answers the next question.
        released = await gw.client.post(f"/admin/api/conversations/{conversation_id}/release", headers=BEARER)
        assert released.json()["changed"] is True
        assert fake_api.chat_texts(USER_ID)[-1] == fixed_text("handoff_agent_left", "en")
        await gw.post(private_message(4, "when will it arrive?"))
        await fake_api_wait(fake_api, 5)
        assert model.asked == ["when will it arrive?"]
        assert fake_api.chat_texts(USER_ID)[-1] == "Bot answer: when will it arrive?"

        # Every console action is in the audit log, with the agent's name.
        audit = (await gw.client.get(f"/admin/api/audit/{conversation_id}", headers=BEARER)).json()
        actions = [(r["kind"], r["actor"], r["data"].get("action")) for r in audit]
        assert ("handoff", "admin:api", "taken_over") in actions
        assert ("admin", "admin:Mei", "reply") in actions
        assert ("handoff", "admin:api", "returned_to_bot") in actions


async def test_unanswered_handoff_times_out_with_a_notice_and_a_ticket(
    tmp_path: Path, fake_api: FakeBotAPI
) -> None:
    from datetime import timedelta

    from core.db.models import utcnow

    model = RecordingModel()
    settings = telegram_settings(tmp_path, fake_api, admin_token=ADMIN_TOKEN, scheduler_enabled=False)
    async with gateway(settings, model) as gw:
        await gw.post(private_message(11, "转人工", language_code="zh-hans"))
        await fake_api_wait(fake_api, 1)
        assert fake_api.chat_texts(USER_ID) == [fixed_text("handoff_waiting", "zh")]
        runtime = gw.runtime
        result = await expire_handoffs(
            runtime.conversations,
            store=runtime.store,
            senders=gw.app.state.senders,
            waited_longer_than=timedelta(minutes=30),
            audit=runtime.audit,
            now=utcnow() + timedelta(minutes=31),
        )
        assert result["released"] == 1 and result["notified"] == 1
        assert fake_api.chat_texts(USER_ID)[-1] == fixed_text("handoff_timeout", "zh")
        assert await _state(gw) == "bot"
        tickets = (await gw.client.get("/admin/api/tickets?status=open", headers=BEARER)).json()
        assert [t["category"] for t in tickets] == ["handoff"]
        assert "转人工" in tickets[0]["summary"]


async def fake_api_wait(fake: FakeBotAPI, count: int) -> None:
    async def arrived() -> bool:
        return len(fake.sent(USER_ID)) >= count

    await eventually(arrived)


async def test_console_refuses_strangers_on_a_running_gateway(tmp_path: Path, fake_api: FakeBotAPI) -> None:
    settings = telegram_settings(tmp_path, fake_api, admin_token=ADMIN_TOKEN)
    async with gateway(settings, RecordingModel()) as gw:
        await gw.post(private_message(21, "/human"))
        await fake_api_wait(fake_api, 1)
        conversation_id = await _conversation_id(gw)
        refused = await gw.client.post(
            f"/admin/api/conversations/{conversation_id}/reply",
            headers={"Authorization": "Bearer wrong"},
            json={"text": "spoofed"},
        )
        assert refused.status_code == 401
        assert isinstance(refused, httpx.Response)
        assert len(fake_api.sent(USER_ID)) == 1
