"""The gateway with the console switched on, driven in-process (httpx + the app's lifespan)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette

from bots.gateway import create_app
from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from core.messages import ConversationKey, InboundMessage, Reply
from core.runtime import Runtime
from core.settings import Settings, load_settings

ADMIN_TOKEN = "admin-token-for-kefu-tests-0123456789"
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BASE_URL = "http://kefu.test"


def answer(request: ChatRequest) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            return f"Bot answer: {message.content}"
    return "Bot answer"


def admin_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'kefu.db'}",
        "redis_url": None,
        "admin_token": ADMIN_TOKEN,
        "scheduler_enabled": False,
        **overrides,
    }
    return load_settings(_env_file=None, **values)


@dataclass
class Console:
    app: Starlette
    http: httpx.AsyncClient

    @property
    def runtime(self) -> Runtime:
        runtime = self.app.state.runtime
        assert isinstance(runtime, Runtime)
        return runtime

    async def customer_says(
        self, text: str, *, chat_id: str = "browser-session-1", channel: str = "web"
    ) -> Reply:
        """A customer message answered by the engine directly (no platform needed)."""
        message = InboundMessage(
            key=ConversationKey(channel=channel, chat_id=chat_id),
            user_id=chat_id,
            message_id=f"{chat_id}-{text}",
            text=text,
            language="zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en",
        )
        return await self.runtime.engine.handle(message)

    async def login(self, name: str = "Mei") -> None:
        response = await self.http.post(
            "/admin/login", data={"token": ADMIN_TOKEN, "name": name, "next": "/admin/conversations"}
        )
        assert response.status_code == 303, response.text


@contextlib.asynccontextmanager
async def running_console(settings: Settings, model: FunctionModel | None = None) -> AsyncIterator[Console]:
    app = create_app(settings, model=model or FunctionModel(answer))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            yield Console(app=app, http=http)
