"""A fake Telegram Bot API server, update builders and the gateway wired to both.

:class:`FakeBotAPI` is an aiohttp.web server on 127.0.0.1 speaking the Bot API wire format
(``POST /bot<token>/<method>``, form or JSON parameters, ``{"ok": true, "result": ...}`` answers). It
records every call, keeps the messages it accepted (and their edits), refuses what Telegram refuses
(unparsable HTML, text over 4096 characters after entity parsing, editing to the same text), answers
getUpdates from a scripted queue with long polling, and can be told to fail the next calls of a method
(429 with ``retry_after``, 500...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from starlette.applications import Starlette

from bots.gateway import create_app
from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from core.runtime import Runtime
from core.settings import Settings, load_settings

BOT_ID = 7012345678
TOKEN = f"{BOT_ID}:AAH-fake_token_for_kefu_tests_0123456"
BOT_USERNAME = "kefu_test_bot"
SECRET = "s3cret-token_for-kefu"
USER_ID = 424242
GROUP_ID = -1001234567890

_ALLOWED_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "code", "pre", "a", "tg-spoiler"}
_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
_HTML_TOKEN = re.compile(
    r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)((?:\s[^<>]*)?)>|&(#[0-9]+|#x[0-9a-fA-F]+|[a-zA-Z]+);|[<>&]"
)


def parse_html(text: str) -> str:
    """The visible text of a Telegram-HTML message; ValueError where Telegram says "can't parse"."""
    out: list[str] = []
    stack: list[str] = []
    pos = 0
    for match in _HTML_TOKEN.finditer(text):
        out.append(text[pos : match.start()])
        pos = match.end()
        if match.group(2):
            tag = match.group(2).lower()
            if tag not in _ALLOWED_TAGS:
                raise ValueError(f'Unsupported start tag "{tag}" at byte offset {match.start()}')
            if match.group(1):
                if not stack or stack.pop() != tag:
                    raise ValueError(f'Unmatched end tag at byte offset {match.start()}, expected "</{tag}>"')
            else:
                stack.append(tag)
        elif match.group(4):
            name = match.group(4)
            if name.startswith("#x"):
                out.append(chr(int(name[2:], 16)))
            elif name.startswith("#"):
                out.append(chr(int(name[1:])))
            elif name in _ENTITIES:
                out.append(_ENTITIES[name])
            else:
                raise ValueError(f"Unsupported HTML entity at byte offset {match.start()}")
        else:
            raise ValueError(f"Character '{match.group(0)}' is reserved and must be escaped")
    out.append(text[pos:])
    if stack:
        raise ValueError(f'Can\'t find end tag corresponding to start tag "{stack[-1]}"')
    return "".join(out)


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    status: int = 200


@dataclass
class FakeBotAPI:
    token: str = TOKEN
    calls: list[Call] = field(default_factory=list)
    messages: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    """Messages the bot has in each chat, as Telegram would show them now (edits applied)."""
    updates: list[dict[str, Any]] = field(default_factory=list)
    webhook_url: str | None = None
    webhook_secret: str | None = None
    poll_hold: float = 0.3
    """Seconds an empty getUpdates is held open (real Telegram: the ``timeout`` parameter)."""
    on_get_updates: Callable[[int | None], Awaitable[None]] | None = None
    _failures: dict[str, list[tuple[int, dict[str, Any]]]] = field(default_factory=lambda: defaultdict(list))
    _next_id: int = 100
    _polling: int = 0
    _new_updates: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    # --- scripting ---

    def fail_next(
        self, method: str, status: int, description: str, *, retry_after: int | None = None
    ) -> None:
        body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
        self._failures[method].append((status, body))

    def flood_next(self, method: str, retry_after: int = 1) -> None:
        self.fail_next(method, 429, f"Too Many Requests: retry after {retry_after}", retry_after=retry_after)

    def push_update(self, update: dict[str, Any]) -> None:
        self.updates.append(update)
        self._new_updates.set()

    # --- what the customer sees ---

    def calls_to(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    def sent(self, chat_id: int | None = None) -> list[Call]:
        """sendMessage calls Telegram accepted, in order."""
        return [
            call
            for call in self.calls_to("sendMessage")
            if call.status == 200 and (chat_id is None or call.params["chat_id"] == chat_id)
        ]

    def chat_texts(self, chat_id: int) -> list[str]:
        """The visible texts of the bot's messages in ``chat_id``, oldest first."""
        return [m["text"] for (chat, _), m in sorted(self.messages.items()) if chat == chat_id]

    # --- server ---

    async def _params(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            raw: dict[str, Any] = await request.json()
        else:
            raw = dict(await request.post())
        params: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, str) and key in {
                "reply_parameters",
                "allowed_updates",
                "entities",
                "reply_markup",
                "link_preview_options",
            }:
                value = json.loads(value)
            elif isinstance(value, str) and key in {
                "chat_id",
                "message_id",
                "offset",
                "timeout",
                "limit",
                "message_thread_id",
            }:
                value = int(value)
            params[key] = value
        return params

    async def handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401
            )
        method = request.match_info["method"]
        params = await self._params(request)
        call = Call(method, params)
        self.calls.append(call)
        if self._failures[method]:
            status, body = self._failures[method].pop(0)
            call.status = status
            return web.json_response(body, status=status)
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            call.status = 404
            return web.json_response({"ok": False, "error_code": 404, "description": "Not Found"}, status=404)
        try:
            result = await handler(params)
        except _Refused as refused:
            call.status = 400
            return web.json_response(
                {"ok": False, "error_code": 400, "description": f"Bad Request: {refused}"}, status=400
            )
        return web.json_response({"ok": True, "result": result})

    def _bot_user(self) -> dict[str, Any]:
        return {"id": BOT_ID, "is_bot": True, "first_name": "Kefu", "username": BOT_USERNAME}

    def _visible(self, params: dict[str, Any]) -> str:
        text = str(params.get("text", ""))
        if params.get("parse_mode") == "HTML":
            try:
                text = parse_html(text)
            except ValueError as exc:
                raise _Refused(f"can't parse entities: {exc}") from exc
        if not text.strip():
            raise _Refused("message text is empty")
        if utf16_len(text) > 4096:
            raise _Refused("message is too long")
        return text

    async def _m_getMe(self, params: dict[str, Any]) -> Any:
        return {**self._bot_user(), "can_join_groups": True, "can_read_all_group_messages": False}

    async def _m_sendMessage(self, params: dict[str, Any]) -> Any:
        text = self._visible(params)
        chat_id = params["chat_id"]
        self._next_id += 1
        message = {
            "message_id": self._next_id,
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},
            "from": self._bot_user(),
            "text": text,
        }
        self.messages[(chat_id, self._next_id)] = message
        return message

    async def _m_editMessageText(self, params: dict[str, Any]) -> Any:
        key = (params["chat_id"], params["message_id"])
        if key not in self.messages:
            raise _Refused("message to edit not found")
        text = self._visible(params)
        message = self.messages[key]
        if message["text"] == text:
            raise _Refused(
                "message is not modified: specified new message content and reply markup are exactly "
                "the same as a current content and reply markup of the message"
            )
        message.update(text=text, edit_date=int(time.time()))
        return message

    async def _m_deleteMessage(self, params: dict[str, Any]) -> Any:
        if self.messages.pop((params["chat_id"], params["message_id"]), None) is None:
            raise _Refused("message to delete not found")
        return True

    async def _m_sendChatAction(self, params: dict[str, Any]) -> Any:
        return True

    async def _m_setWebhook(self, params: dict[str, Any]) -> Any:
        self.webhook_url = params["url"]
        self.webhook_secret = params.get("secret_token")
        return True

    async def _m_deleteWebhook(self, params: dict[str, Any]) -> Any:
        self.webhook_url = None
        return True

    async def _m_getUpdates(self, params: dict[str, Any]) -> Any:
        if self.webhook_url is not None:
            raise _Conflict(
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first"
            )
        if self._polling:
            raise _Conflict(
                "Conflict: terminated by other getUpdates request; "
                "make sure that only one bot instance is running"
            )
        self._polling += 1
        try:
            return await self._get_updates(params)
        finally:
            self._polling -= 1

    async def _get_updates(self, params: dict[str, Any]) -> Any:
        offset = params.get("offset")
        if self.on_get_updates is not None:
            await self.on_get_updates(offset)
        if offset is not None:  # confirms everything before it
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
        if not self.updates:
            self._new_updates.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._new_updates.wait(), min(self.poll_hold, params.get("timeout", 0))
                )
        return list(self.updates)


class _Refused(Exception):
    pass


class _Conflict(Exception):
    pass


@contextlib.asynccontextmanager
async def running_fake() -> AsyncIterator[FakeBotAPI]:
    fake = FakeBotAPI()

    async def handle(request: web.Request) -> web.Response:
        try:
            return await fake.handle(request)
        except _Conflict as conflict:
            fake.calls[-1].status = 409
            body = {"ok": False, "error_code": 409, "description": str(conflict)}
            return web.json_response(body, status=409)

    app = web.Application()
    app.router.add_post("/bot{token}/{method}", handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeBotAPI]:
    async with running_fake() as fake:
        yield fake


# --- updates as Telegram sends them --------------------------------------------------------------

_message_ids = iter(range(5000, 10**9))


def user(*, language_code: str | None = "en", user_id: int = USER_ID) -> dict[str, Any]:
    person: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": "Ada", "username": "ada"}
    if language_code is not None:
        person["language_code"] = language_code
    return person


def private_message(
    update_id: int,
    text: str | None = "hello",
    *,
    language_code: str | None = "en",
    chat_id: int = USER_ID,
    **extra: Any,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "message_id": next(_message_ids),
        "date": int(time.time()),
        "chat": {"id": chat_id, "type": "private", "first_name": "Ada"},
        "from": user(language_code=language_code, user_id=chat_id),
        **extra,
    }
    if text is not None:
        message["text"] = text
        if text.startswith("/"):
            command = text.split()[0]
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": utf16_len(command)}]
    return {"update_id": update_id, "message": message}


def group_message(update_id: int, text: str, *, mention: bool = False, **extra: Any) -> dict[str, Any]:
    """A supergroup message; ``mention=True`` puts ``@kefu_test_bot`` in front with its entity."""
    entities = []
    if mention:
        text = f"@{BOT_USERNAME} {text}"
        entities.append({"type": "mention", "offset": 0, "length": len(BOT_USERNAME) + 1})
    message: dict[str, Any] = {
        "message_id": next(_message_ids),
        "date": int(time.time()),
        "chat": {"id": GROUP_ID, "type": "supergroup", "title": "Support group"},
        "from": user(),
        "text": text,
        **extra,
    }
    if entities:
        message["entities"] = entities
    return {"update_id": update_id, "message": message}


# --- the gateway ---------------------------------------------------------------------------------


def last_user_text(request: ChatRequest) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            return message.content
    return ""


def telegram_settings(tmp_path: Path, fake: FakeBotAPI, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'kefu.db'}",
        "redis_url": None,
        "telegram_token": TOKEN,
        "telegram_webhook_secret": SECRET,
        "telegram_api_base": fake.url,
        **overrides,
    }
    return load_settings(_env_file=None, **values)


@dataclass
class Gateway:
    app: Starlette
    client: httpx.AsyncClient
    statuses: list[int] = field(default_factory=list)

    @property
    def runtime(self) -> Runtime:
        runtime = self.app.state.runtime
        assert isinstance(runtime, Runtime)
        return runtime

    async def post(
        self,
        body: bytes | dict[str, Any],
        *,
        secret: str | None = SECRET,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        all_headers = {"content-type": "application/json", **(headers or {})}
        if secret is not None:
            all_headers["X-Telegram-Bot-Api-Secret-Token"] = secret
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await self.client.post("/telegram/webhook", content=content, headers=all_headers)
        self.statuses.append(response.status_code)
        return response


def gateway(settings: Settings, model: FunctionModel) -> contextlib.AbstractAsyncContextManager[Gateway]:
    """The gateway with its lifespan (runtime, worker, Telegram background tasks) running."""
    return serve(create_app(settings, model=model))


@contextlib.asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[Gateway]:
    """Run ``app``'s lifespan and talk to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            gw = Gateway(app=app, client=client)
            yield gw
            # A 5xx is never an answer to anything these tests send.
            assert all(status < 500 for status in gw.statuses), gw.statuses


async def wait_until(predicate: Callable[[], bool], *, within: float = 15.0) -> None:
    """Wait for the worker (asynchronous by design) to make ``predicate`` true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for the condition")
        await asyncio.sleep(0.02)
