"""Hand-off through the Slack adapter against the fake Slack Web API server."""

from __future__ import annotations

from pathlib import Path

from core.messages import ConversationKey
from core.texts import text as fixed_text
from tests.handoff.conftest import ADMIN_TOKEN, BEARER, RecordingModel, eventually
from tests.slack.conftest import DM, event_callback, message_event, running_gateway, slack_settings
from tests.slack.fake_slack import FakeSlack


def _dm_texts(fake: FakeSlack) -> list[str]:
    return [m.text for m in fake.thread(DM, None)]


async def test_zhuan_rengong_agent_reply_and_return_to_bot(tmp_path: Path, fake_slack: FakeSlack) -> None:
    model = RecordingModel()
    settings = slack_settings(tmp_path, fake_slack, admin_token=ADMIN_TOKEN)
    async with running_gateway(settings, fake_slack, model) as gw:

        async def dm_count(n: int) -> None:
            async def arrived() -> bool:
                return len(_dm_texts(fake_slack)) >= n

            await eventually(arrived)

        # The customer asks for a person in a DM: the waiting notice, the model is not asked.
        response = await gw.post_event(event_callback(message_event("转人工")))
        assert response.status_code == 200
        await dm_count(1)
        assert _dm_texts(fake_slack) == [fixed_text("handoff_waiting", "zh")]
        assert model.asked == []
        conversation = await gw.runtime.conversations.get(ConversationKey(channel="slack", chat_id=DM))
        assert conversation is not None and conversation.state == "waiting"
        cid = conversation.id

        # Waiting: the bot is silent.
        await gw.post_event(event_callback(message_event("在吗？")))
        await gw.idle()
        assert len(_dm_texts(fake_slack)) == 1 and model.asked == []

        # The agent's reply from the console arrives in the DM (take-over notice first).
        reply = await gw.http.post(
            f"/admin/api/conversations/{cid}/reply", headers=BEARER, json={"text": "您好，我是客服小王。"}
        )
        assert reply.status_code == 201, reply.text
        assert _dm_texts(fake_slack)[1:] == [fixed_text("handoff_agent_joined", "zh"), "您好，我是客服小王。"]
        posted = fake_slack.calls_of("chat.postMessage")[-1]
        assert posted.params["channel"] == DM

        # Handed back: the customer is told and the bot answers again.
        released = await gw.http.post(f"/admin/api/conversations/{cid}/release", headers=BEARER)
        assert released.json() == {"changed": True, "state": "bot"}
        assert _dm_texts(fake_slack)[-1] == fixed_text("handoff_agent_left", "zh")
        await gw.post_event(event_callback(message_event("运费多少？")))

        async def answered() -> bool:
            return _dm_texts(fake_slack)[-1] == "Bot answer: 运费多少？"

        await eventually(answered)  # streamed: the final edit carries the whole answer
        assert model.asked == ["运费多少？"]
