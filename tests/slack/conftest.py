"""Slack test helpers: the fake Slack server, signed Events API requests, the gateway in-process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from bots.gateway import create_app
from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from core.runtime import Runtime
from core.settings import Settings, load_settings
from tests.slack.fake_slack import FakeSlack

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
BOT_USER = "UBOT"
CUSTOMER = "UCUSTOMER"
SUPPORT = "CSUPPORT"
GENERAL = "CGENERAL"
DM = "DCUSTOMER"

_event_ids = itertools.count(1)
_ts = itertools.count(1)


def last_user_text(request: ChatRequest) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            return message.content
    return ""


def answer(request: ChatRequest) -> str:
    return f"Answer to: {last_user_text(request)}"


def next_ts() -> str:
    return f"1700000000.{next(_ts):06d}"


def event_callback(event: dict[str, Any], *, event_id: str | None = None) -> dict[str, Any]:
    """An Events API ``event_callback`` body as Slack sends it."""
    return {
        "token": "deprecated-verification-token",
        "team_id": "T1",
        "api_app_id": "A1",
        "event": event,
        "type": "event_callback",
        "event_id": event_id or f"Ev{next(_event_ids):08d}",
        "event_time": int(time.time()),
        "authorizations": [
            {
                "enterprise_id": None,
                "team_id": "T1",
                "user_id": BOT_USER,
                "is_bot": True,
                "is_enterprise_install": False,
            }
        ],
        "is_ext_shared_channel": False,
        "event_context": "4-eyJldCI6Im1lc3NhZ2UifQ",
    }


def message_event(
    text: str,
    *,
    channel: str = DM,
    channel_type: str = "im",
    ts: str | None = None,
    thread_ts: str | None = None,
    user: str = CUSTOMER,
    **fields: Any,
) -> dict[str, Any]:
    """A ``message`` event (``message.im`` / ``message.channels``)."""
    event: dict[str, Any] = {
        "type": "message",
        "channel": channel,
        "user": user,
        "text": text,
        "ts": ts or next_ts(),
        "event_ts": ts,
        "channel_type": channel_type,
        "team": "T1",
        "client_msg_id": "5f1c3b4e-0000-4000-8000-000000000000",
    }
    event["event_ts"] = event["ts"]
    if thread_ts is not None:
        event["thread_ts"] = thread_ts
    event.update(fields)
    return event


def mention_event(
    text: str, *, channel: str, ts: str | None = None, thread_ts: str | None = None
) -> dict[str, Any]:
    """An ``app_mention`` event."""
    event: dict[str, Any] = {
        "type": "app_mention",
        "user": CUSTOMER,
        "text": text,
        "ts": ts or next_ts(),
        "channel": channel,
        "team": "T1",
    }
    event["event_ts"] = event["ts"]
    if thread_ts is not None:
        event["thread_ts"] = thread_ts
    return event


def signed_headers(
    body: bytes, *, secret: str = SIGNING_SECRET, timestamp: int | None = None
) -> dict[str, str]:
    """The headers Slack adds: ``v0=`` HMAC-SHA256 of ``v0:{timestamp}:{body}``."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return {
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": f"v0={digest}",
        "Content-Type": "application/json",
    }


@dataclass
class Gateway:
    """The gateway app with its lifespan running, and a client that posts signed events."""

    app: Starlette
    http: httpx.AsyncClient
    fake: FakeSlack
    model: FunctionModel

    @property
    def runtime(self) -> Runtime:
        runtime = self.app.state.runtime
        assert isinstance(runtime, Runtime)
        return runtime

    async def post_event(
        self, payload: dict[str, Any], *, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        body = json.dumps(payload).encode()
        return await self.http.post(
            "/slack/events", content=body, headers={**signed_headers(body), **(headers or {})}
        )

    async def idle(self, within: float = 10.0) -> None:
        """Wait until the worker has answered (and acknowledged) everything in the inbox."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while await self.runtime.inbox.depth() > 0:
            if loop.time() > deadline:
                raise TimeoutError("the worker did not finish")
            await asyncio.sleep(0.02)


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = FakeSlack()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def slack_settings(tmp_path: Path, fake: FakeSlack, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "_env_file": None,
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'kefu.db'}",
        "redis_url": None,
        "slack_bot_token": "xoxb-test-token",
        "slack_signing_secret": SIGNING_SECRET,
        "slack_api_base": fake.api_base,
        "slack_support_channels": [SUPPORT],
    }
    values.update(overrides)
    return load_settings(**values)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, fake: FakeSlack, model: FunctionModel
) -> AsyncIterator[Gateway]:
    app = create_app(settings, model=model)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kefu.test") as http:
            yield Gateway(app=app, http=http, fake=fake, model=model)


@pytest.fixture
def model() -> FunctionModel:
    return FunctionModel(answer)


@pytest.fixture
async def gateway(tmp_path: Path, fake_slack: FakeSlack, model: FunctionModel) -> AsyncIterator[Gateway]:
    async with running_gateway(slack_settings(tmp_path, fake_slack), fake_slack, model) as gateway:
        yield gateway
