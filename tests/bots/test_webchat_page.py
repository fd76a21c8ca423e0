"""The chat page in a real browser (headless Chromium via Playwright) across a gateway restart.

The gateway is stopped while it is writing an answer and another one starts on the same address, with
Redis and the database in common (a rolling deploy). The page reconnects by itself, sends its
unanswered message again and says which replies it has seen; it must show the answer exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from playwright.async_api import Page, async_playwright, expect
from starlette.applications import Starlette

from bots.gateway import create_app
from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from core.settings import Settings, load_settings
from tests.bots.conftest import answer, free_port, last_user_text
from tests.reliability.conftest import RedisServer

pytestmark = [pytest.mark.browser, pytest.mark.redis]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
WAIT_MS = 20_000


@contextlib.asynccontextmanager
async def gateway(settings: Settings, model: FunctionModel, port: int) -> AsyncIterator[uvicorn.Server]:
    """A gateway on ``port``; leaving the block stops it as a deploy would (SIGTERM-like)."""
    app: Starlette = create_app(settings, model=model)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped during start-up")
            await asyncio.sleep(0.02)
        yield server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=60)


class HeldModel(FunctionModel):
    def __init__(self) -> None:
        super().__init__(self._answer)
        self.questions: list[str] = []
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def _answer(self, request: ChatRequest) -> str:
        self.questions.append(last_user_text(request))
        self.asked.set()
        await self.release.wait()
        return answer(request)


def bot_bubbles(page: Page, text: str) -> object:
    return page.locator(".msg.bot", has_text=text)


async def test_an_answer_written_during_a_gateway_restart_shows_once_after_the_page_reconnects(
    tmp_path: Path,
) -> None:
    redis_server = RedisServer(tmp_path)
    await redis_server.start()
    settings = load_settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'k.db'}",
        redis_url=redis_server.url,
        scheduler_enabled=False,
    )
    port = free_port()
    first_model, second_model = HeldModel(), HeldModel()
    second_model.release.set()
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await (await browser.new_context(locale="zh-CN")).new_page()
                async with gateway(settings, first_model, port) as first:
                    await page.goto(f"http://127.0.0.1:{port}/")
                    await expect(page.locator("#status")).to_have_class("status online", timeout=WAIT_MS)
                    await page.fill("#input", "我的订单到哪了")
                    await page.press("#input", "Enter")
                    await asyncio.wait_for(first_model.asked.wait(), timeout=WAIT_MS / 1000)
                    # The deploy stops this gateway: its sockets close first, then its worker finishes
                    # the answer it is writing, with no browser connected.
                    first.should_exit = True
                    await expect(page.locator("#status")).to_have_class("status offline", timeout=WAIT_MS)
                    first_model.release.set()

                async with gateway(settings, second_model, port):
                    answer_bubbles = page.locator(".msg.bot", has_text="关于「我的订单到哪了」")
                    await expect(answer_bubbles).to_have_count(1, timeout=WAIT_MS)
                    await expect(answer_bubbles).to_have_text(
                        "您好，关于「我的订单到哪了」: here is the answer."
                    )
                    await expect(page.locator("#status")).to_have_class("status online")

                    await page.fill("#input", "谢谢")
                    await page.press("#input", "Enter")
                    await expect(page.locator(".msg.bot", has_text="关于「谢谢」")).to_have_count(
                        1, timeout=WAIT_MS
                    )
                    await expect(answer_bubbles).to_have_count(1)
                    await expect(page.locator(".msg.bot.waiting")).to_have_count(0)
                    await expect(page.locator(".msg.user.queued")).to_have_count(0)
            finally:
                await browser.close()
    finally:
        await redis_server.kill()
    # The page sent its unanswered message again to the new gateway: recognised, not answered twice.
    assert first_model.questions == ["我的订单到哪了"]
    assert second_model.questions == ["谢谢"]
