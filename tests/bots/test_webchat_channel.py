"""The web chat as a channel: intake, inbox and worker, frames through the store, reconnects.

Real uvicorn servers and real WebSocket clients. The Redis tests run two gateways (two processes'
worth: each its own runtime, store connections, inbox consumer and worker) on one Redis database of
their own and one SQL database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import websockets
from redis.asyncio import Redis

from adapters.webchat import WebChatSender
from core.handoff import take_over
from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from core.messages import (
    ConversationKey,
    InboundMessage,
    Reply,
    ReplyDelta,
    ReplyDone,
    ReplyEvent,
    ReplySource,
)
from core.settings import Settings, load_settings
from core.stores.redis import RedisStore
from core.texts import text as fixed_text
from tests.bots.conftest import LiveServer, answer, last_user_text, live_server
from tests.reliability.conftest import RedisServer

Frame = dict[str, Any]
Socket = websockets.ClientConnection
WAIT = 15.0
"""Hang guard for one frame; never a timing claim."""


def new_session() -> str:
    # Redis pub/sub channels are global to the server (not per database): keep sessions unique.
    return f"t{secrets.token_hex(8)}"


async def send(ws: Socket, client_id: str, text: str) -> None:
    await ws.send(json.dumps({"type": "message", "id": client_id, "text": text}))


async def next_frame(ws: Socket) -> Frame:
    frame: Frame = json.loads(await asyncio.wait_for(ws.recv(), timeout=WAIT))
    return frame


async def frames_until(ws: Socket, kind: str, client_id: str) -> list[Frame]:
    """Every frame up to and including the first of ``kind`` for ``client_id``."""
    seen: list[Frame] = []
    while True:
        seen.append(await next_frame(ws))
        if seen[-1]["type"] == kind and seen[-1].get("id") == client_id:
            return seen


async def collect(ws: Socket, done: Callable[[list[Frame]], bool]) -> list[Frame]:
    """Frames until ``done(frames)`` holds."""
    seen: list[Frame] = []
    while not done(seen):
        seen.append(await next_frame(ws))
    return seen


def replies(frames: list[Frame]) -> list[tuple[str, str]]:
    return [(f["id"], f["text"]) for f in frames if f["type"] == "reply"]


def about(frames: list[Frame], client_id: str) -> list[Frame]:
    return [f for f in frames if f.get("id") == client_id]


async def stored_turns(server: LiveServer, session: str) -> list[tuple[str, str]]:
    runtime = server.runtime
    conversation = await runtime.conversations.get(ConversationKey(channel="web", chat_id=session))
    if conversation is None or conversation.id is None:
        return []
    return [(m.role, m.content) for m in await runtime.conversations.messages(conversation.id)]


async def wait_for_turns(server: LiveServer, session: str, count: int) -> list[tuple[str, str]]:
    turns: list[tuple[str, str]] = []
    for _ in range(int(WAIT / 0.05)):
        turns = await stored_turns(server, session)
        if len(turns) >= count:
            return turns
        await asyncio.sleep(0.05)
    return turns


class CountingModel(FunctionModel):
    """Answers like the shared fixture, optionally holding answers until released; counts questions."""

    def __init__(self, label: str = "") -> None:
        super().__init__(self._answer)
        self.label = label
        self.questions: list[str] = []
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def _answer(self, request: ChatRequest) -> str:
        self.questions.append(last_user_text(request))
        self.asked.set()
        await self.release.wait()
        return f"{self.label}{answer(request)}"


def answer_text(question: str, label: str = "") -> str:
    return f"{label}您好，关于「{question}」: here is the answer."


async def test_a_frame_sent_again_after_a_reconnect_gets_one_answer(settings: Settings) -> None:
    model = CountingModel()
    session = new_session()
    async with live_server(settings, model) as server:
        async with websockets.connect(f"{server.ws_url}?session={session}&since=0") as ws:
            await send(ws, "c1", "where is my parcel")
            first = await frames_until(ws, "reply", "c1")
        assert replies(first) == [("c1", answer_text("where is my parcel"))]
        seq = first[-1]["seq"]

        # The page reconnects and, not sure the server had it, sends c1 again, then a new message.
        async with websockets.connect(f"{server.ws_url}?session={session}&since={seq}") as ws:
            await send(ws, "c1", "where is my parcel")
            await send(ws, "c2", "thanks")
            second = await frames_until(ws, "reply", "c2")

    assert about(second, "c1") == [], "the repeated frame was answered again"
    assert replies(second) == [("c2", answer_text("thanks"))]
    assert model.questions == ["where is my parcel", "thanks"]
    assert [text for role, text in await stored_turns(server, session) if role == "user"] == [
        "where is my parcel",
        "thanks",
    ]


async def test_a_frame_sent_again_while_its_answer_is_written_gets_one_answer(settings: Settings) -> None:
    model = CountingModel()
    model.release.clear()
    session = new_session()
    async with live_server(settings, model) as server:
        async with websockets.connect(f"{server.ws_url}?session={session}&since=0") as ws:
            await send(ws, "c1", "refund please")
            await asyncio.wait_for(model.asked.wait(), timeout=WAIT)
        # The connection dropped mid-answer; the page reconnects and sends c1 again.
        async with websockets.connect(f"{server.ws_url}?session={session}&since=0") as ws:
            await send(ws, "c1", "refund please")
            model.release.set()
            got = await frames_until(ws, "reply", "c1")
            await send(ws, "c2", "ok")
            got += await frames_until(ws, "reply", "c2")

    assert replies(got) == [("c1", answer_text("refund please")), ("c2", answer_text("ok"))]
    assert model.questions == ["refund please", "ok"]


async def test_a_reply_finished_while_the_browser_was_away_arrives_on_reconnect_exactly_once(
    settings: Settings,
) -> None:
    model = CountingModel()
    model.release.clear()
    session = new_session()
    async with live_server(settings, model) as server:
        async with websockets.connect(f"{server.ws_url}?session={session}&since=0") as ws:
            await send(ws, "c1", "where is my parcel")
            await asyncio.wait_for(model.asked.wait(), timeout=WAIT)
        model.release.set()  # the answer is finished with nobody connected
        assert await wait_for_turns(server, session, 2) == [
            ("user", "where is my parcel"),
            ("assistant", answer_text("where is my parcel")),
        ]

        async with websockets.connect(f"{server.ws_url}?session={session}&since=0") as ws:
            missed = await next_frame(ws)
            await send(ws, "c2", "and my invoice?")
            after = await frames_until(ws, "reply", "c2")
        assert (missed["type"], missed["id"], missed["seq"]) == ("reply", "c1", 1)
        assert missed["text"] == answer_text("where is my parcel")
        assert about(after, "c1") == [], "the missed reply was sent twice"
        assert after[-1]["seq"] == 2

        # Having seen reply 2, the page gets nothing old on its next connection.
        async with websockets.connect(f"{server.ws_url}?session={session}&since=2") as ws:
            await send(ws, "c3", "bye")
            last = await frames_until(ws, "reply", "c3")
        assert [f["id"] for f in last] == ["c3"] * len(last)
        # A client that does not say what it saw (an old page) gets live frames only.
        async with websockets.connect(f"{server.ws_url}?session={session}") as ws:
            await send(ws, "c4", "one more")
            plain = await frames_until(ws, "reply", "c4")
        assert [f["id"] for f in plain] == ["c4"] * len(plain)


async def test_every_open_tab_of_a_session_sees_the_answer(settings: Settings) -> None:
    session = new_session()
    async with (
        live_server(settings, CountingModel()) as server,
        websockets.connect(f"{server.ws_url}?session={session}&since=0") as asking,
        websockets.connect(f"{server.ws_url}?session={session}&since=0") as watching,
    ):
        await send(asking, "c1", "hello")
        asked = await frames_until(asking, "reply", "c1")
        watched = await frames_until(watching, "reply", "c1")
    assert replies(asked) == replies(watched) == [("c1", answer_text("hello"))]


async def test_over_the_rate_limit_the_page_gets_the_notice_then_a_refusal(db_url: str) -> None:
    settings = load_settings(_env_file=None, database_url=db_url, redis_url=None, rate_limit_per_minute=2)
    model = CountingModel()
    session = new_session()
    async with (
        live_server(settings, model) as server,
        websockets.connect(f"{server.ws_url}?session={session}&since=0") as ws,
    ):
        for n in range(1, 5):
            await send(ws, f"m{n}", f"question {n}")
        got = await collect(
            ws,
            lambda frames: {("reply", "m3"), ("error", "m4")} <= {(f["type"], f.get("id")) for f in frames},
        )

    final = {f["id"]: f for f in got if f["type"] == "reply"}
    assert final["m1"]["text"] == answer_text("question 1")
    assert final["m2"]["text"] == answer_text("question 2")
    # The first message over the limit is answered with the notice, by the worker, without the model.
    assert (final["m3"]["text"], final["m3"]["source"]) == (fixed_text("rate_limited", "en"), "system")
    refusal = next(f for f in got if f["type"] == "error")
    assert (refusal["id"], refusal["code"]) == ("m4", "rate_limited")
    assert refusal["text"] == fixed_text("rate_limited", "en")
    assert model.questions == ["question 1", "question 2"]


# --- several processes sharing Redis -----------------------------------------------------------------

REDIS_HOST = "redis://127.0.0.1:6379"
_CLAIM = "kefu-test:webchat-claim"


@pytest.fixture
async def redis_db() -> AsyncIterator[str]:
    """A Redis database of this test's own (an empty one it claims), flushed afterwards.

    The runtime's store and inbox use fixed names (key prefix ``kefu:``, stream ``kefu:inbox``), so
    a database number is what keeps parallel test runs apart.
    """
    token = uuid.uuid4().hex
    for db in (*range(4, 14), 1, 2):
        client = Redis.from_url(f"{REDIS_HOST}/{db}", decode_responses=True)
        try:
            if await client.set(_CLAIM, token, nx=True, ex=600) and await client.dbsize() == 1:
                try:
                    yield f"{REDIS_HOST}/{db}"
                finally:
                    await client.flushdb()
                return
            if await client.get(_CLAIM) == token:
                await client.delete(_CLAIM)
        finally:
            await client.aclose()
    pytest.fail("no free Redis database for the test")


@contextlib.asynccontextmanager
async def two_gateways(
    settings: Settings, model_a: FunctionModel, model_b: FunctionModel
) -> AsyncIterator[tuple[LiveServer, LiveServer]]:
    async with live_server(settings, model_a) as a, live_server(settings, model_b) as b:
        yield a, b


@pytest.mark.redis
async def test_two_gateways_on_redis_deliver_answers_to_sockets_on_either(
    tmp_path: Path, redis_db: str
) -> None:
    settings = load_settings(
        _env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}", redis_url=redis_db
    )
    model_a, model_b = CountingModel("[A] "), CountingModel("[B] ")
    session = new_session()
    async with two_gateways(settings, model_a, model_b) as (a, b):
        async with (
            websockets.connect(f"{a.ws_url}?session={session}&since=0") as on_a,
            websockets.connect(f"{b.ws_url}?session={session}&since=0") as on_b,
        ):
            questions = [f"question {n}" for n in range(4)]
            for n, question in enumerate(questions):
                await send(on_a, f"c{n}", question)
            seen_a = await frames_until(on_a, "reply", "c3")
            seen_b = await frames_until(on_b, "reply", "c3")
            # The page sends c0 again after a reconnect to gateway B: still one answer.
            await send(on_b, "c0", questions[0])
            await send(on_b, "c4", "done")
            seen_b += await frames_until(on_b, "reply", "c4")
            seen_a += await frames_until(on_a, "reply", "c4")

        # Each question answered once, in order, by whichever gateway's worker took it; both
        # sockets (on both gateways) got every answer once.
        answered = replies(seen_a)
        assert [client_id for client_id, _ in answered] == ["c0", "c1", "c2", "c3", "c4"]
        assert replies(seen_b) == answered
        for (_, text), question in zip(answered, [*questions, "done"], strict=True):
            assert text in (answer_text(question, "[A] "), answer_text(question, "[B] "))
        assert sorted(model_a.questions + model_b.questions) == sorted([*questions, "done"])
        assert [f["seq"] for f in seen_a if f["type"] == "reply"] == [1, 2, 3, 4, 5]

        # A reply finished while the browser was away is waiting on the other gateway.
        for model in (model_a, model_b):
            model.asked.clear()
            model.release.clear()
        async with websockets.connect(f"{a.ws_url}?session={session}&since=5") as ws:
            await send(ws, "c5", "still there?")
            await asyncio.wait_for(either(model_a.asked, model_b.asked), timeout=WAIT)
        model_a.release.set()
        model_b.release.set()
        assert len(await wait_for_turns(a, session, 12)) == 12
        async with websockets.connect(f"{b.ws_url}?session={session}&since=5") as ws:
            missed = await next_frame(ws)
            await send(ws, "c6", "bye")
            after = await frames_until(ws, "reply", "c6")
        assert (missed["type"], missed["id"], missed["seq"]) == ("reply", "c5", 6)
        assert about(after, "c5") == []

        # Both gateways see one conversation in the shared database.
        assert await stored_turns(a, session) == await stored_turns(b, session)


async def either(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


@pytest.mark.redis
async def test_frames_published_by_a_worker_in_another_process_reach_the_socket(
    tmp_path: Path, redis_db: str
) -> None:
    settings = load_settings(
        _env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path / 'k.db'}", redis_url=redis_db
    )
    session = new_session()
    message = InboundMessage(
        key=ConversationKey(channel="web", chat_id=session),
        user_id=session,
        message_id=f"{session}:c1",
        text="where is my parcel",
        language="en",
    )

    async def events() -> AsyncIterator[ReplyEvent]:
        yield ReplyDelta(text="It left ")
        yield ReplyDelta(text="the depot")
        reply = Reply(key=message.key, text="It left the depot today.", language="en", in_reply_to="x")
        yield ReplyDone(reply=reply.model_copy(update={"in_reply_to": message.message_id}))

    # "Another process": its own store connection, only the Redis server in common.
    other = RedisStore(url=redis_db)
    try:
        async with (
            live_server(settings, CountingModel()) as server,
            websockets.connect(f"{server.ws_url}?session={session}&since=0") as ws,
        ):
            await WebChatSender(store=other).deliver(message, events())
            got = await frames_until(ws, "reply", "c1")
    finally:
        await other.aclose()
    assert [(f["type"], f["text"]) for f in got] == [
        ("delta", "It left "),
        ("delta", "the depot"),
        ("reply", "It left the depot today."),
    ]
    assert {f["id"] for f in got} == {"c1"}


@pytest.mark.redis
async def test_a_redis_outage_closes_sockets_for_a_retry_and_the_chat_recovers(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)  # a server of its own, to stop and start again
    await redis_server.start()
    settings = load_settings(
        _env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path / 'k.db'}", redis_url=redis_server.url
    )
    session = new_session()
    try:
        async with live_server(settings, CountingModel()) as server:
            async with websockets.connect(f"{server.ws_url}?session={session}&since=0") as ws:
                await send(ws, "c1", "hello")
                await frames_until(ws, "reply", "c1")
                # Let the worker finish its bookkeeping for c1 (acknowledge it) before the outage.
                for _ in range(int(WAIT / 0.05)):
                    if await server.runtime.inbox.depth() == 0:
                        break
                    await asyncio.sleep(0.05)
                await redis_server.kill()
                with pytest.raises(websockets.ConnectionClosed) as dropped:
                    while True:
                        await next_frame(ws)
            # 1011 "try again later": the page reconnects; nothing crashed.
            assert dropped.value.rcvd is not None and dropped.value.rcvd.code == 1011
            async with websockets.connect(f"{server.ws_url}?session={session}&since=1") as ws:
                with pytest.raises(websockets.ConnectionClosed) as refused:
                    await next_frame(ws)
            assert refused.value.rcvd is not None and refused.value.rcvd.code == 1011

            await redis_server.start()
            async with websockets.connect(f"{server.ws_url}?session={session}&since=1") as ws:
                await send(ws, "c2", "back again")
                got = await frames_until(ws, "reply", "c2")
            assert replies(got) == [("c2", answer_text("back again"))]
    finally:
        await redis_server.kill()


async def test_while_a_person_has_the_conversation_the_page_is_told_no_bot_answer_follows(
    settings: Settings,
) -> None:
    model = CountingModel()
    session = new_session()
    async with (
        live_server(settings, model) as server,
        websockets.connect(f"{server.ws_url}?session={session}&since=0") as ws,
    ):
        await send(ws, "c1", "I want a refund")
        await frames_until(ws, "reply", "c1")
        key = ConversationKey(channel="web", chat_id=session)
        conversation = await server.runtime.conversations.get(key)
        assert conversation is not None and conversation.id is not None
        assert await take_over(server.runtime.conversations, conversation.id)

        await send(ws, "c2", "hello? anyone?")
        held = await next_frame(ws)
        # The agent answers from the console, through the same sender the worker uses.
        sender = server.app.state.senders.get("web")
        await sender.send(Reply(key=key, text="Hi, I am Mei.", language="en", source=ReplySource.AGENT))
        agent = await next_frame(ws)

    assert held == {"type": "held", "id": "c2"}
    assert (agent["type"], agent["text"], agent["source"], agent["id"]) == (
        "reply",
        "Hi, I am Mei.",
        "agent",
        None,
    )
    assert model.questions == ["I want a refund"]
    assert ("user", "hello? anyone?") in await stored_turns(server, session)
