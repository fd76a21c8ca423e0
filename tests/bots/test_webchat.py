"""The web chat over its WebSocket: streaming, persistence, sessions, bad frames, disconnects."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from core.messages import ConversationKey
from core.settings import Settings
from tests.bots.conftest import SwitchableModel, answer, live_server, runtime_of

SESSION_A = "sessionAAAA1234"
SESSION_B = "sessionBBBB5678"


def exchange(ws: Any, text: str, client_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Send one message; return the delta frames and the final reply frame."""
    ws.send_text(json.dumps({"type": "message", "id": client_id, "text": text}))
    deltas: list[dict[str, Any]] = []
    while True:
        frame = ws.receive_json()
        if frame["type"] == "delta":
            deltas.append(frame)
        else:
            assert frame["type"] == "reply", frame
            return deltas, frame


def transcript(client: TestClient, session: str) -> list[tuple[str, str]]:
    runtime = runtime_of(client.app)  # type: ignore[arg-type]

    async def read() -> list[tuple[str, str]]:
        key = ConversationKey(channel="web", chat_id=session)
        conversation = await runtime.conversations.get(key)
        if conversation is None or conversation.id is None:
            return []
        return [(m.role, m.content) for m in await runtime.conversations.messages(conversation.id)]

    assert client.portal is not None
    return client.portal.call(read)


def test_a_message_streams_deltas_then_the_reply_and_both_are_stored(client: TestClient) -> None:
    with client.websocket_connect(f"/ws?session={SESSION_A}") as ws:
        deltas, reply = exchange(ws, "我的订单到哪了", "c1")

    assert len(deltas) > 1, "the answer should arrive in pieces"
    assert all(d["id"] == "c1" for d in deltas)
    assert reply["id"] == "c1"
    assert reply["text"] == "您好，关于「我的订单到哪了」: here is the answer."
    # The streamed draft is the start of the answer (the output moderator holds back the last few
    # characters); the final reply replaces it.
    assert reply["text"].startswith("".join(d["text"] for d in deltas))
    assert reply["source"] == "model"
    assert reply["lang"] == "zh"
    assert transcript(client, SESSION_A) == [("user", "我的订单到哪了"), ("assistant", reply["text"])]


def test_the_final_reply_replaces_the_streamed_text(settings: Settings) -> None:
    # A model that rambles into garbage: the engine replaces it; the page must show the replacement.
    from bots.gateway import create_app

    model = FunctionModel(lambda request: "}}}}}}}}")
    with (
        TestClient(create_app(settings, model=model)) as client,
        client.websocket_connect(f"/ws?session={SESSION_A}") as ws,
    ):
        deltas, reply = exchange(ws, "hello", "c1")
    # whatever draft was streamed is the model's text (the moderator may hold the tail back) ...
    assert "}}}}}}}}".startswith("".join(d["text"] for d in deltas))
    # the engine replaced the unusable answer (apology or FAQ fallback): the reply frame carries it
    assert reply["source"] != "model"
    assert reply["text"].strip() and "}}" not in reply["text"]
    assert reply["lang"] == "en"


def test_two_browser_sessions_are_two_conversations(client: TestClient, model: SwitchableModel) -> None:
    with (
        client.websocket_connect(f"/ws?session={SESSION_A}") as ws_a,
        client.websocket_connect(f"/ws?session={SESSION_B}") as ws_b,
    ):
        exchange(ws_a, "first from A", "a1")
        exchange(ws_b, "first from B", "b1")
        exchange(ws_a, "second from A", "a2")

    # B's question never appears in A's prompt, and A's history carries over within A
    prompt_for_a2 = [m.content for m in model.requests[-1].messages]
    assert "first from A" in prompt_for_a2
    assert "first from B" not in prompt_for_a2
    assert [text for role, text in transcript(client, SESSION_A) if role == "user"] == [
        "first from A",
        "second from A",
    ]
    assert [text for role, text in transcript(client, SESSION_B) if role == "user"] == ["first from B"]


def test_the_same_session_continues_after_reconnecting(client: TestClient, model: SwitchableModel) -> None:
    with client.websocket_connect(f"/ws?session={SESSION_A}") as ws:
        exchange(ws, "my name is Li", "c1")
    with client.websocket_connect(f"/ws?session={SESSION_A}") as ws:
        exchange(ws, "what is my name", "c2")
    assert "my name is Li" in [m.content for m in model.requests[-1].messages]


def test_malformed_frames_get_error_frames_and_the_socket_stays_usable(client: TestClient) -> None:
    with client.websocket_connect(f"/ws?session={SESSION_A}") as ws:
        ws.send_text("this is not json")
        assert ws.receive_json()["code"] == "bad_json"

        ws.send_text(json.dumps(["a", "list"]))
        assert ws.receive_json()["code"] == "bad_frame"

        ws.send_text(json.dumps({"type": "message"}))
        frame = ws.receive_json()
        assert (frame["type"], frame["code"]) == ("error", "missing_text")

        ws.send_text(json.dumps({"type": "message", "text": 42}))
        assert ws.receive_json()["code"] == "missing_text"

        ws.send_text(json.dumps({"type": "message", "text": "长" * 30_000}))  # 90 KB of UTF-8
        frame = ws.receive_json()
        assert frame["code"] == "too_large"
        assert "4000" in frame["text"] and frame["lang"] == "zh"

        ws.send_bytes(b"\xff\xfe not utf-8")
        assert ws.receive_json()["code"] == "bad_json"

        _, reply = exchange(ws, "still there?", "c1")
        assert reply["text"].startswith("您好")

    # only the good message reached the conversation
    assert [role for role, _ in transcript(client, SESSION_A)] == ["user", "assistant"]


def test_a_browser_without_a_session_is_given_one(client: TestClient) -> None:
    with client.websocket_connect("/ws") as ws:
        frame = ws.receive_json()
        assert frame["type"] == "session"
        session = frame["session"]
        exchange(ws, "hi", "c1")
    assert [role for role, _ in transcript(client, session)] == ["user", "assistant"]


@pytest.mark.parametrize("session", ["short", "has space in it", "a:b:c:d:e:f", "x" * 65])
def test_an_invalid_session_id_is_refused(client: TestClient, session: str) -> None:
    with client.websocket_connect("/ws", params={"session": session}) as ws:
        frame = ws.receive_json()
        assert (frame["type"], frame["code"]) == ("error", "bad_session")
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1008


async def test_over_a_real_socket_an_answer_is_finished_and_stored_when_the_browser_leaves(
    settings: Settings,
) -> None:
    gate = asyncio.Event()
    asked = asyncio.Event()

    async def slow_answer(request: ChatRequest) -> str:
        asked.set()
        await gate.wait()
        return answer(request)

    async with live_server(settings, FunctionModel(slow_answer)) as server:
        async with websockets.connect(f"{server.ws_url}?session={SESSION_A}") as ws:
            await ws.send(json.dumps({"id": "c1", "text": "where is my parcel"}))
            await asyncio.wait_for(asked.wait(), timeout=10)
        # the browser is gone before the model answered
        gate.set()
        key = ConversationKey(channel="web", chat_id=SESSION_A)
        stored: list[tuple[str, str]] = []
        for _ in range(200):
            conversation = await server.runtime.conversations.get(key)
            assert conversation is not None and conversation.id is not None
            stored = [
                (m.role, m.content) for m in await server.runtime.conversations.messages(conversation.id)
            ]
            if len(stored) == 2:
                break
            await asyncio.sleep(0.05)
        assert stored == [("user", "where is my parcel"), ("assistant", answer_text("where is my parcel"))]

        # and the server keeps serving new connections
        async with websockets.connect(f"{server.ws_url}?session={SESSION_B}") as ws:
            await ws.send(json.dumps({"id": "c2", "text": "hello"}))
            frames = [json.loads(await asyncio.wait_for(ws.recv(), timeout=10))]
            while frames[-1]["type"] != "reply":
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=10)))
        assert frames[-1]["text"] == answer_text("hello")


def answer_text(question: str) -> str:
    return f"您好，关于「{question}」: here is the answer."
