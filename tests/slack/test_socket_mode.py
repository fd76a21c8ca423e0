"""Socket Mode: slack_sdk's aiohttp SocketModeClient against the fake's apps.connections.open + WebSocket."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from slack_sdk.socket_mode.request import SocketModeRequest

from bots.slack import handle_envelope
from core.inbox.memory import MemoryInbox
from core.intake import Intake
from core.llm.testing import FunctionModel
from core.stores.memory import MemoryStore
from tests.slack.conftest import (
    BOT_USER,
    DM,
    GENERAL,
    answer,
    event_callback,
    mention_event,
    message_event,
    next_ts,
    running_gateway,
    slack_settings,
)
from tests.slack.fake_slack import FakeSlack


def envelope(payload: dict[str, Any], *, retry_attempt: int = 0, kind: str = "events_api") -> dict[str, Any]:
    """A Socket Mode envelope as Slack sends it over the WebSocket."""
    return {
        "envelope_id": str(uuid.uuid4()),
        "payload": payload,
        "type": kind,
        "accepts_response_payload": False,
        "retry_attempt": retry_attempt,
        "retry_reason": "timeout" if retry_attempt else "",
    }


async def test_socket_mode_events_are_acknowledged_and_answered(
    tmp_path: Path, fake_slack: FakeSlack
) -> None:
    settings = slack_settings(
        tmp_path, fake_slack, slack_signing_secret=None, slack_app_token="xapp-1-A1-test"
    )
    model = FunctionModel(answer)
    async with running_gateway(settings, fake_slack, model) as gateway:
        await fake_slack.wait_connected()
        opened = fake_slack.calls_of("apps.connections.open")
        assert opened and opened[0].authorization == "Bearer xapp-1-A1-test"

        first = envelope(event_callback(message_event("where is my parcel?")))
        await fake_slack.push(first)
        await fake_slack.wait_until(lambda: len(fake_slack.thread(DM, None)) == 1)
        await gateway.idle()
        assert {"envelope_id": first["envelope_id"]} in fake_slack.acks
        assert fake_slack.thread(DM, None)[0].text == "Answer to: where is my parcel?"

        # Slack resends an envelope it thinks was not acknowledged: acknowledged again, not answered again.
        again = envelope(first["payload"], retry_attempt=1)
        ts = next_ts()
        mention = envelope(
            event_callback(mention_event(f"<@{BOT_USER}> opening hours?", channel=GENERAL, ts=ts))
        )
        await fake_slack.push(again)
        await fake_slack.push(mention)
        await fake_slack.wait_until(lambda: len(fake_slack.thread(GENERAL, ts)) == 1)
        await gateway.idle()
        acked = {ack["envelope_id"] for ack in fake_slack.acks}
        assert {again["envelope_id"], mention["envelope_id"]} <= acked
        assert len(fake_slack.thread(DM, None)) == 1
        assert fake_slack.thread(GENERAL, ts)[0].text == "Answer to: opening hours?"
        assert len(model.requests) == 2

        # HTTP mode is off without a signing secret: nobody can post unsigned events.
        response = await gateway.post_event(event_callback(message_event("hello")))
        assert response.status_code == 404


async def test_an_envelope_is_acknowledged_only_after_the_inbox_took_it() -> None:
    store, inbox = MemoryStore(), MemoryInbox()
    intake = Intake(store=store, inbox=inbox)
    request = SocketModeRequest.from_dict(envelope(event_callback(message_event("refund please"))))
    assert request is not None

    response = await handle_envelope(request, intake=intake, support_channels=())
    assert response is not None and response.envelope_id == request.envelope_id
    assert await inbox.depth() == 1

    class BrokenInbox(MemoryInbox):
        async def put(self, message: Any) -> str:
            raise ConnectionError("redis is down")

    broken = Intake(store=MemoryStore(), inbox=BrokenInbox())
    assert await handle_envelope(request, intake=broken, support_channels=()) is None  # Slack will resend

    # envelopes kefu does not use are acknowledged so Slack stops sending them
    command = SocketModeRequest.from_dict(
        envelope({"command": "/kefu", "text": "hi", "channel_id": DM}, kind="slash_commands")
    )
    assert command is not None
    assert await handle_envelope(command, intake=broken, support_channels=()) is not None
