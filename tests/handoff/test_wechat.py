"""Hand-off through the WeChat adapter against the fake WeChat API server.

"转人工" gets the waiting notice as a passive reply; while a person has the conversation the bot is
silent (WeChat gets "success"); the agent's words arrive through the customer-service API; handed back,
the bot answers again.
"""

from __future__ import annotations

from pathlib import Path

from core.messages import ConversationKey
from core.texts import text as fixed_text
from tests.handoff.conftest import ADMIN_TOKEN, BEARER, RecordingModel
from tests.wechat.conftest import (
    OPENID,
    FakeWeChat,
    gateway,
    reply_content,
    text_xml,
    wait_for,
    wechat_settings,
)

KEY = ConversationKey(channel="wechat", chat_id=OPENID)


async def test_wechat_customer_agent_and_back_to_bot(tmp_path: Path, fake_wechat: FakeWeChat) -> None:
    model = RecordingModel()
    settings = wechat_settings(tmp_path, fake_wechat, admin_token=ADMIN_TOKEN)
    async with gateway(settings, model) as gw:
        admin = f"http://127.0.0.1:{gw.server.port}/admin/api"

        asked = await gw.post(text_xml("转人工", msg_id="5001"))
        assert reply_content(asked.text) == fixed_text("handoff_waiting", "zh")
        assert model.asked == []
        conversation = await gw.server.runtime.conversations.get(KEY)
        assert conversation is not None and conversation.state == "waiting"

        # Waiting for a person: the bot stays silent, WeChat is told "success".
        silent = await gw.post(text_xml("有人吗？", msg_id="5002"))
        assert reply_content(silent.text) is None
        await gw.settled()
        assert fake_wechat.texts() == [] and model.asked == []

        # The agent takes over and writes: both go out through the customer-service API.
        taken = await gw.http.post(f"{admin}/conversations/{conversation.id}/takeover", headers=BEARER)
        assert taken.status_code == 200
        said = await gw.http.post(
            f"{admin}/conversations/{conversation.id}/reply",
            headers=BEARER,
            json={"text": "您好，我是客服小美。"},
        )
        assert said.status_code == 201, said.text
        assert fake_wechat.texts() == [fixed_text("handoff_agent_joined", "zh"), "您好，我是客服小美。"]

        # Back to the bot: the customer is told, and the bot answers the next question itself.
        await gw.http.post(f"{admin}/conversations/{conversation.id}/release", headers=BEARER)
        await wait_for(lambda: fake_wechat.texts()[-1] == fixed_text("handoff_agent_left", "zh"))
        again = await gw.post(text_xml("我的订单到哪了？", msg_id="5003"))
        await gw.settled()
        answered = reply_content(again.text) or fake_wechat.texts()[-1]
        assert answered == "Bot answer: 我的订单到哪了？"
        assert model.asked == ["我的订单到哪了？"]
