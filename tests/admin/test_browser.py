"""End to end in a real browser: headless Chromium (Debian's ``/usr/bin/chromium``) driven by Playwright.

A customer chats on the web chat page while an agent uses the console in a second browser context:
log in, watch the conversation arrive live, take it over, reply (the reply shows up in the web chat),
hand it back to the bot, open and close a ticket, search the audit log, and edit an FAQ answer and see
the web chat get the new cached answer. Screenshots of the main pages go to ``test-output/``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from core.llm.testing import FunctionModel
from core.texts import text as fixed_text
from tests.admin.conftest import ADMIN_TOKEN, admin_settings, answer
from tests.bots.conftest import live_server

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(__file__).resolve().parents[2] / "test-output"
WAIT_MS = 15_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def customer_asks(chat: Page, text: str) -> None:
    await chat.fill("#input", text)
    await chat.press("#input", "Enter")


def bot_bubble(chat: Page, text: str) -> Locator:
    return chat.locator(".msg.bot", has_text=text)


async def sees(chat: Page, text: str) -> None:
    """The customer sees ``text`` in a bubble from our side (bot, notice or agent)."""
    await expect(bot_bubble(chat, text)).to_be_visible(timeout=WAIT_MS)


async def test_agent_console_end_to_end(tmp_path: Path, browser: Browser) -> None:
    settings = admin_settings(tmp_path)
    async with live_server(settings, FunctionModel(answer)) as server:
        base = f"http://127.0.0.1:{server.port}"
        chat = await (await browser.new_context(locale="zh-CN")).new_page()
        agent_context = await browser.new_context(locale="en-US", viewport={"width": 1400, "height": 900})
        console = await agent_context.new_page()
        try:
            # The customer starts a conversation in the web chat; the bot answers.
            await chat.goto(f"{base}/")
            await customer_asks(chat, "你好")
            await sees(chat, "Bot answer: 你好")

            # The agent is sent to the login form, logs in with the token and lands on the live list.
            await console.goto(f"{base}/admin/conversations")
            await expect(console).to_have_url(f"{base}/admin/login?next=/admin/conversations")
            await console.fill("#token", ADMIN_TOKEN)
            await console.fill("#name", "Mei")
            await shot(console, "admin-login")
            await console.click("#login-form button[type=submit]")
            await expect(console).to_have_url(f"{base}/admin/conversations")
            rows = console.locator("#conversations tbody tr[data-conversation]")
            await expect(rows).to_have_count(1)
            await expect(rows.first).to_contain_text("Bot answer: 你好")

            # A new customer message shows up in the list without a reload (server-sent events).
            await customer_asks(chat, "我的订单 KF20251103001 到哪了")
            await sees(chat, "Bot answer: 我的订单")
            await expect(console.locator("#conversations")).to_contain_text(
                "Bot answer: 我的订单 KF20251103001", timeout=WAIT_MS
            )
            await expect(console.locator("#conversations")).to_contain_text("KF20251103001")  # pinned
            await shot(console, "admin-conversations")

            # Open the transcript and take the conversation over: the customer is told.
            await rows.first.locator("a").first.click()
            await expect(console.locator("#state")).to_have_text("bot")
            await console.click("#take-over")
            await expect(console.locator("#state")).to_have_text("agent")
            await expect(bot_bubble(chat, fixed_text("handoff_agent_joined", "zh"))).to_be_visible(
                timeout=WAIT_MS
            )

            # While the agent has it, the customer's message appears live for the agent, with no bot answer.
            await customer_asks(chat, "在吗？我想退货")
            await expect(console.locator("#transcript")).to_contain_text("在吗？我想退货", timeout=WAIT_MS)

            # The agent's reply arrives in the web chat.
            await console.fill("#reply-text", "您好，我是客服小美，马上为您办理退货。")
            await console.click("#send-reply")
            await expect(bot_bubble(chat, "您好，我是客服小美，马上为您办理退货。")).to_be_visible(
                timeout=WAIT_MS
            )
            await expect(console.locator("#transcript .msg.agent")).to_contain_text("客服小美")
            await expect(console.locator("#reply-text")).to_have_value("")
            assert await bot_bubble(chat, "Bot answer: 在吗").count() == 0

            # A ticket for the return, from the conversation page.
            await console.fill("#ticket-form textarea[name=summary]", "退货申请 KF20251103001")
            await console.click("#ticket-form button[type=submit]")
            await expect(console.locator("#conversation-tickets")).to_contain_text("退货申请")
            await shot(console, "admin-conversation")

            # Back to the bot: the customer is told, and the bot answers again.
            await console.click("#return-to-bot")
            await expect(console.locator("#state")).to_have_text("bot")
            await expect(bot_bubble(chat, fixed_text("handoff_agent_left", "zh"))).to_be_visible(
                timeout=WAIT_MS
            )
            await customer_asks(chat, "谢谢")
            await sees(chat, "Bot answer: 谢谢")
            await shot(chat, "webchat-customer")

            # FAQ: add an entry, the web chat gets it from the cache; edit it, the web chat gets the new one.
            await console.goto(f"{base}/admin/faq")
            await console.click("details.add summary")
            await console.fill("#faq-add input[name=question]", "运费多少钱")
            await console.fill("#faq-add textarea[name=answer]", "满99元包邮。")
            await console.click("#faq-add button[type=submit]")
            entry = console.locator("form.faq-entry").first
            await expect(entry.locator("textarea[name=answer]")).to_have_value("满99元包邮。")
            await customer_asks(chat, "运费多少钱")
            await sees(chat, "满99元包邮。")
            await entry.locator("textarea[name=answer]").fill("全场包邮，无门槛。")
            await entry.locator("button[type=submit]").click()
            await expect(
                console.locator("form.faq-entry").first.locator("textarea[name=answer]")
            ).to_have_value("全场包邮，无门槛。")
            await shot(console, "admin-faq")
            await customer_asks(chat, "运费多少钱")
            await sees(chat, "全场包邮，无门槛。")

            # Tickets list: close the ticket.
            await console.goto(f"{base}/admin/tickets")
            ticket = console.locator("#tickets tr.ticket", has_text="退货申请")
            await expect(ticket).to_contain_text("open")
            await ticket.locator("button").click()
            await expect(console.locator("#tickets tr.ticket", has_text="退货申请")).to_contain_text("closed")
            await shot(console, "admin-tickets")

            # Audit search for the conversation shows the agent's actions under their name.
            await console.goto(f"{base}/admin/audit")
            await console.fill("input[name=conversation]", "1")
            await console.click("form.inline-form button")
            audit = console.locator("#audit")
            await expect(audit).to_contain_text("taken_over")
            await expect(audit).to_contain_text("admin:Mei")
            await expect(audit).to_contain_text("returned_to_bot")
            await shot(console, "admin-audit")
        finally:
            await agent_context.close()
            await chat.context.close()
