"""The contract every :class:`~core.llm.base.ChatModel` backend passes.

Each test runs once per backend. A backend takes part through a *harness fixture* that returns a
:class:`Harness`: the model under test plus a ``script`` callable that queues what the model answers
next. ``HARNESSES`` maps the parameter id to that fixture's name.

The embedded llama.cpp backend takes part with the real SmolLM2 GGUF (marked ``model``). Adding a backend:

1. Write a fixture returning ``Harness(model=LlamaCppModel(...), script=lambda reply: None,
   scripted=False)`` (in ``tests/llm/conftest.py`` or a plugin module), closing the model afterwards.
   A real model ignores the script; the assertions below hold for any sensible answer, and the exact
   texts are only checked when ``scripted`` is true.
2. Add ``"llamacpp": "llamacpp_harness"`` to ``HARNESSES`` (mark it ``pytest.mark.model`` if it runs
   real inference).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from core.llm.base import ChatMessage, ChatModel, ChatRequest, ToolSpec
from core.llm.llamacpp import LlamaCppModel
from core.llm.ollama import OllamaModel
from core.llm.openai_compat import OpenAICompatModel
from tests.llm.fake_ollama import FakeOllama
from tests.llm.fake_openai import FakeOpenAI
from tests.llm.scripted import ScriptedReply


@dataclass
class Harness:
    model: ChatModel
    script: Callable[[ScriptedReply], None]
    scripted: bool = True


@pytest.fixture
def ollama_harness(ollama_model: OllamaModel, fake_ollama: FakeOllama) -> Harness:
    return Harness(model=ollama_model, script=fake_ollama.queue)


@pytest.fixture
def openai_harness(openai_model: OpenAICompatModel, fake_openai: FakeOpenAI) -> Harness:
    return Harness(model=openai_model, script=fake_openai.queue)


@pytest.fixture(scope="module")
def llamacpp_model() -> Iterator[LlamaCppModel]:
    # Loaded lazily on first use, once for the module.
    model = LlamaCppModel(n_ctx=2048, max_tokens=48, temperature=0.0, seed=7)
    yield model
    asyncio.run(model.aclose())


@pytest.fixture
def llamacpp_harness(llamacpp_model: LlamaCppModel) -> Harness:
    """The embedded backend with the real SmolLM2 GGUF: real inference, nothing scripted."""
    return Harness(model=llamacpp_model, script=lambda reply: None, scripted=False)


HARNESSES = {"ollama": "ollama_harness", "openai": "openai_harness", "llamacpp": "llamacpp_harness"}


@pytest.fixture(
    params=[
        pytest.param(name, marks=pytest.mark.model) if name == "llamacpp" else name
        for name in sorted(HARNESSES)
    ]
)
def harness(request: pytest.FixtureRequest) -> Harness:
    value: Harness = request.getfixturevalue(HARNESSES[request.param])
    return value


SYSTEM = ChatMessage.system("You are the customer-service agent of a web shop. Answer briefly.")
ORDER_TOOL = ToolSpec(
    name="get_order_status",
    description="Look up the shipping status of an order by its id.",
    parameters={
        "type": "object",
        "properties": {"order_id": {"type": "string", "description": "The order id, e.g. A1001"}},
        "required": ["order_id"],
    },
)
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
    "required": ["answer", "confidence"],
}


async def test_plain_answer(harness: Harness) -> None:
    harness.script(ScriptedReply.answer("您好，", "请问有什么可以帮您？"))
    response = await harness.model.complete(ChatRequest(messages=(SYSTEM, ChatMessage.user("你好"))))
    assert response.content.strip()
    assert response.tool_calls == ()
    assert response.finish_reason in ("stop", "length")
    assert not response.truncated
    if harness.scripted:
        assert response.content == "您好，请问有什么可以帮您？"


async def test_streamed_deltas_join_to_the_final_content(harness: Harness) -> None:
    harness.script(ScriptedReply.answer("Returns ", "are free ", "within 7 days."))
    chunks = [
        chunk
        async for chunk in harness.model.stream(
            ChatRequest(messages=(SYSTEM, ChatMessage.user("What is your return policy?")))
        )
    ]
    assert [chunk.done for chunk in chunks].count(True) == 1
    final = chunks[-1]
    assert final.done and final.response is not None
    deltas = [chunk.delta for chunk in chunks[:-1]]
    assert all(deltas)
    assert "".join(deltas) == final.response.content
    if harness.scripted:
        assert deltas == ["Returns ", "are free ", "within 7 days."]


async def test_tool_call_round_trip(harness: Harness) -> None:
    harness.script(ScriptedReply.call("get_order_status", {"order_id": "A1001"}))
    harness.script(ScriptedReply.answer("Order A1001 ", "has shipped."))
    question = ChatMessage.user("Where is my order A1001? Look it up.")
    asked = await harness.model.complete(ChatRequest(messages=(SYSTEM, question), tools=(ORDER_TOOL,)))
    if not harness.scripted and not asked.tool_calls:
        # A real model may answer directly; then the answer must be usable text.
        assert asked.content.strip()
        return
    assert len(asked.tool_calls) == 1
    call = asked.tool_calls[0]
    assert call.name == "get_order_status"
    assert isinstance(call.arguments, dict)
    assert set(call.arguments) == {"order_id"} and isinstance(call.arguments["order_id"], str)
    assert call.id
    if harness.scripted:
        assert call.arguments == {"order_id": "A1001"}

    history = (
        SYSTEM,
        question,
        ChatMessage.assistant(asked.content, tool_calls=asked.tool_calls),
        ChatMessage.tool(call, json.dumps({"order_id": "A1001", "status": "shipped"})),
    )
    answered = await harness.model.complete(
        ChatRequest(messages=history, tools=(ORDER_TOOL,) if harness.scripted else ())
    )
    assert answered.tool_calls == ()
    assert answered.content.strip()
    if harness.scripted:
        assert answered.content == "Order A1001 has shipped."


async def test_json_schema_answer_decodes(harness: Harness) -> None:
    harness.script(ScriptedReply.answer('{"answer": "', "七天无理由退货", '", "confidence": 0.9}'))
    response = await harness.model.complete(
        ChatRequest(
            messages=(SYSTEM, ChatMessage.user("退货政策是什么？请用 JSON 回答。")),
            json_schema=ANSWER_SCHEMA,
        )
    )
    decoded = response.decode_json()
    assert isinstance(decoded, dict)
    assert isinstance(decoded["answer"], str) and decoded["answer"]
    assert isinstance(decoded["confidence"], int | float)
    if harness.scripted:
        assert decoded == {"answer": "七天无理由退货", "confidence": 0.9}


async def test_usage_is_reported(harness: Harness) -> None:
    harness.script(ScriptedReply.answer("OK", prompt_tokens=57, completion_tokens=3))
    response = await harness.model.complete(ChatRequest(messages=(SYSTEM, ChatMessage.user("ping"))))
    assert response.usage.prompt_tokens > 0
    assert response.usage.completion_tokens > 0
    if harness.scripted:
        assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (57, 3)
