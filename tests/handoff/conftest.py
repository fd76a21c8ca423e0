"""Shared helpers for the hand-off tests: a model that records what it was asked, the console token."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from tests.slack.conftest import fake_slack  # noqa: F401 - fixture for this folder
from tests.telegram.conftest import fake_api  # noqa: F401 - fixture for this folder
from tests.wechat.conftest import fake_wechat  # noqa: F401 - fixture for this folder

ADMIN_TOKEN = "admin-token-for-kefu-tests-0123456789"
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def last_user_text(request: ChatRequest) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            return message.content
    return ""


class RecordingModel(FunctionModel):
    """Answers "Bot answer: <question>" and keeps every question it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

        def respond(request: ChatRequest) -> str:
            question = last_user_text(request)
            self.asked.append(question)
            return f"Bot answer: {question}"

        super().__init__(respond)


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 15.0) -> None:
    """Wait for asynchronous work (the worker) to make ``check`` true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for the condition")
        await asyncio.sleep(0.02)
