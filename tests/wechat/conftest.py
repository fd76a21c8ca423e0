"""A fake WeChat API server (aiohttp, the real wire format) and builders of signed/encrypted webhook calls.

The fake issues access tokens from ``GET /cgi-bin/token`` (counting fetches), checks the token on
``POST /cgi-bin/message/custom/send`` and ``/custom/typing``, records every call, and can be scripted to
answer errcodes (40001, 42001, 45015, 45047...) or to answer slowly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import xmltodict
from aiohttp import web
from wechatpy.crypto import WeChatCrypto

from core.llm.base import ChatChunk, ChatRequest
from core.llm.testing import FunctionModel
from core.settings import Settings, load_settings
from core.stores.base import StateStore
from core.stores.memory import MemoryStore
from tests.bots.conftest import LiveServer, live_server

APPID = "wx0123456789abcdef"
SECRET = "app-secret-for-tests"
TOKEN = "wechat-test-token"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
OLD_AES_KEY = "0123456789ABCDEFGabcdefghijklmnopqrstuvwxyz"
OTHER_AES_KEY = "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkj"
ACCOUNT = "gh_0123456789ab"
OPENID = "oUser-openid-0001"
REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class Sent:
    touser: str
    content: str
    raw: bytes
    user_agent: str


@dataclass
class FakeWeChat:
    """State of the fake WeChat API."""

    url: str = ""
    expires_in: int = 7200
    token_fetches: int = 0
    valid_tokens: set[str] = field(default_factory=set)
    expired_tokens: set[str] = field(default_factory=set)
    sent: list[Sent] = field(default_factory=list)
    send_attempts: int = 0
    typing: list[dict[str, Any]] = field(default_factory=list)
    user_agents: list[str] = field(default_factory=list)
    send_errors: list[int] = field(default_factory=list)
    """errcodes answered to the next send attempts, first one first."""
    send_delay: float = 0.0
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def issue_token(self) -> str:
        token = f"token-{next(self._counter)}"
        self.valid_tokens.add(token)
        return token

    def expire_all(self) -> None:
        self.expired_tokens |= self.valid_tokens
        self.valid_tokens.clear()

    def texts(self) -> list[str]:
        return [sent.content for sent in self.sent]

    def _token_error(self, request: web.Request) -> dict[str, Any] | None:
        token = request.query.get("access_token", "")
        if token in self.expired_tokens:
            return {"errcode": 42001, "errmsg": "access_token expired"}
        if token not in self.valid_tokens:
            return {"errcode": 40001, "errmsg": "invalid credential, access_token is invalid or not latest"}
        return None

    async def token(self, request: web.Request) -> web.Response:
        self.user_agents.append(request.headers.get("User-Agent", ""))
        query = request.query
        if query.get("grant_type") != "client_credential" or query.get("appid") != APPID:
            return web.json_response({"errcode": 40013, "errmsg": "invalid appid"})
        if query.get("secret") != SECRET:
            return web.json_response({"errcode": 40125, "errmsg": "invalid appsecret"})
        self.token_fetches += 1
        await asyncio.sleep(0.05)  # a real round trip: lets concurrent callers pile up
        return web.json_response({"access_token": self.issue_token(), "expires_in": self.expires_in})

    async def send(self, request: web.Request) -> web.Response:
        self.user_agents.append(request.headers.get("User-Agent", ""))
        raw = await request.read()
        self.send_attempts += 1
        if self.send_delay:
            await asyncio.sleep(self.send_delay)
        if error := self._token_error(request):
            return web.json_response(error)
        if self.send_errors:
            errcode = self.send_errors.pop(0)
            return web.json_response({"errcode": errcode, "errmsg": f"scripted error {errcode}"})
        body = json.loads(raw)
        assert body["msgtype"] == "text"
        self.sent.append(
            Sent(
                touser=body["touser"],
                content=body["text"]["content"],
                raw=raw,
                user_agent=request.headers.get("User-Agent", ""),
            )
        )
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def typing_call(self, request: web.Request) -> web.Response:
        self.user_agents.append(request.headers.get("User-Agent", ""))
        if error := self._token_error(request):
            return web.json_response(error)
        self.typing.append(json.loads(await request.read()))
        return web.json_response({"errcode": 0, "errmsg": "ok"})


@pytest.fixture
async def fake_wechat() -> AsyncIterator[FakeWeChat]:
    fake = FakeWeChat()
    app = web.Application()
    app.router.add_get("/cgi-bin/token", fake.token)
    app.router.add_post("/cgi-bin/message/custom/send", fake.send)
    app.router.add_post("/cgi-bin/message/custom/typing", fake.typing_call)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}/"
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    """The in-process store and a Redis store under a unique prefix (dropped afterwards)."""
    if request.param == "memory":
        yield MemoryStore()
        return
    from core.stores.redis import RedisStore

    prefix = f"kefu-test-wechat-{uuid.uuid4().hex[:8]}:"
    redis_store = RedisStore(url=REDIS_URL, prefix=prefix)
    try:
        yield redis_store
    finally:
        keys = [key async for key in redis_store.client.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis_store.client.delete(*keys)
        await redis_store.aclose()


def wechat_settings(tmp_path: Path, fake: FakeWeChat, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "_env_file": None,
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'kefu.db'}",
        "redis_url": None,
        "wechat_appid": APPID,
        "wechat_secret": SECRET,
        "wechat_token": TOKEN,
        "wechat_api_base": fake.url,
        # Generous for answers meant to be in time on a loaded test machine; SLOW sets 0.5 s.
        "wechat_passive_timeout": 2.0,
    }
    values.update(overrides)
    return load_settings(**values)


def last_user_text(request: ChatRequest) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            return message.content
    return ""


def answer_for(text: str) -> str:
    return f"关于「{text}」：您好，这是答复。"


def fast_model() -> FunctionModel:
    return FunctionModel(lambda request: answer_for(last_user_text(request)))


SLOW = {"wechat_passive_timeout": 0.5}
"""Settings overrides for tests whose model answers after the passive deadline."""


def slow_model(delay: float = 1.2) -> FunctionModel:
    """Answers after the passive deadline of :data:`SLOW` settings has passed."""
    return FunctionModel(lambda request: answer_for(last_user_text(request)), delay=delay)


class SlowStreamModel(FunctionModel):
    """Starts writing at once, then takes ``pause`` seconds to finish: a model still working."""

    def __init__(self, pause: float) -> None:
        super().__init__(lambda request: answer_for(last_user_text(request)))
        self._pause = pause

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        response = await self._respond(request)
        head, tail = response.content[:2], response.content[2:]
        yield ChatChunk(delta=head)
        await asyncio.sleep(self._pause)
        yield ChatChunk(delta=tail)
        yield ChatChunk(done=True, response=response)


# --- building WeChat's requests ------------------------------------------------------------------------


def sign(*parts: str) -> str:
    return hashlib.sha1("".join(sorted(parts)).encode()).hexdigest()


def signed_query(
    *, token: str = TOKEN, timestamp: int | None = None, nonce: str = "nonce123", **extra: str
) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {"signature": sign(token, stamp, nonce), "timestamp": stamp, "nonce": nonce, **extra}


def message_xml(msg_type: str, *, openid: str = OPENID, create_time: int | None = None, **fields: str) -> str:
    created = int(time.time()) if create_time is None else create_time
    inner = "".join(f"<{name}><![CDATA[{value}]]></{name}>" for name, value in fields.items())
    return (
        f"<xml><ToUserName><![CDATA[{ACCOUNT}]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName>"
        f"<CreateTime>{created}</CreateTime><MsgType><![CDATA[{msg_type}]]></MsgType>{inner}</xml>"
    )


def text_xml(content: str, *, msg_id: str = "1000001", openid: str = OPENID) -> str:
    return message_xml("text", openid=openid, Content=content, MsgId=msg_id)


def event_xml(event: str, *, create_time: int = 1_700_000_000, **fields: str) -> str:
    return message_xml("event", create_time=create_time, Event=event, **fields)


def encrypted_request(
    xml: str, *, aes_key: str = AES_KEY, nonce: str = "nonce456"
) -> tuple[dict[str, str], str]:
    """Query and body of a safe-mode POST, encrypted with wechatpy as WeChat's server would."""
    stamp = str(int(time.time()))
    envelope = xmltodict.parse(WeChatCrypto(TOKEN, aes_key, APPID).encrypt_message(xml, nonce, stamp))["xml"]
    body = (
        f"<xml><ToUserName><![CDATA[{ACCOUNT}]]></ToUserName>"
        f"<Encrypt><![CDATA[{envelope['Encrypt']}]]></Encrypt></xml>"
    )
    query = signed_query(
        timestamp=int(stamp), nonce=nonce, encrypt_type="aes", msg_signature=envelope["MsgSignature"]
    )
    return query, body


def decrypt_response(body: str, *, aes_key: str = AES_KEY) -> dict[str, Any]:
    """What WeChat reads from an encrypted passive reply (checks its MsgSignature too)."""
    envelope = xmltodict.parse(body)["xml"]
    xml = WeChatCrypto(TOKEN, aes_key, APPID).decrypt_message(
        envelope, envelope["MsgSignature"], envelope["TimeStamp"], envelope["Nonce"]
    )
    fields: dict[str, Any] = xmltodict.parse(xml)["xml"]
    return fields


def reply_content(body: str) -> str | None:
    """The text of a plain passive reply, or None for ``success``."""
    if body == "success":
        return None
    content: str = xmltodict.parse(body)["xml"]["Content"]
    return content


# --- the gateway ---------------------------------------------------------------------------------------


@dataclass
class Gateway:
    server: LiveServer
    http: httpx.AsyncClient

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/wechat"

    async def post(self, body: str | bytes, query: dict[str, str] | None = None) -> httpx.Response:
        params = signed_query() if query is None else query
        return await self.http.post(self.url + "?" + urlencode(params), content=body)

    async def get(self, query: dict[str, str]) -> httpx.Response:
        return await self.http.get(self.url, params=query)

    async def settled(self) -> None:
        """Wait until the worker has finished every accepted message."""
        await wait_for(lambda: _idle(self.server))


async def _idle(server: LiveServer) -> bool:
    return await server.runtime.inbox.depth() == 0


async def wait_for(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], *, within: float = 10.0
) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def gateway(settings: Settings, model: FunctionModel) -> AsyncIterator[Gateway]:
    async with live_server(settings, model) as server, httpx.AsyncClient(timeout=30) as http:
        yield Gateway(server=server, http=http)
