"""OpenAI-compatible backend (vLLM, llama.cpp server): wire format, stream assembly, error mapping."""

from __future__ import annotations

import pytest

from core.errors import (
    LLMError,
    ModelNotFound,
    ModelOutputError,
    ModelOverloaded,
    ModelTimeout,
    ModelUnavailable,
)
from core.llm.base import ChatMessage, ChatRequest, ToolCall, ToolSpec
from core.llm.openai_compat import OpenAICompatModel
from tests.llm.conftest import OPENAI_MODEL
from tests.llm.fake_openai import FakeOpenAI
from tests.llm.scripted import ScriptedReply, ScriptedToolCall

HELLO = ChatRequest(messages=(ChatMessage.system("Be brief."), ChatMessage.user("你好")))
ORDER_TOOL = ToolSpec(
    name="get_order_status",
    description="Shipping status of an order.",
    parameters={"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
)


# --- what kefu sends -------------------------------------------------------------------------------


async def test_request_streams_with_usage_and_sampling_settings(
    fake_openai: FakeOpenAI, openai_model: OpenAICompatModel
) -> None:
    fake_openai.queue(ScriptedReply.answer("a"), ScriptedReply.answer("b"))
    await openai_model.complete(HELLO)
    await openai_model.complete(HELLO.model_copy(update={"temperature": 0.0, "max_tokens": 64}))

    first, second = fake_openai.chat_bodies()
    assert first["model"] == OPENAI_MODEL
    assert first["stream"] is True
    assert first["stream_options"] == {"include_usage": True}
    assert (first["temperature"], first["max_tokens"]) == (0.3, 512)
    assert (second["temperature"], second["max_tokens"]) == (0.0, 64)
    assert first["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好"},
    ]
    assert "tools" not in first and "response_format" not in first


async def test_tools_and_tool_history_use_openai_forms(
    fake_openai: FakeOpenAI, openai_model: OpenAICompatModel
) -> None:
    fake_openai.queue(ScriptedReply.answer("A1001 已发货。"))
    call = ToolCall(id="call_7", name="get_order_status", arguments={"order_id": "A1001"})
    response = await openai_model.complete(
        ChatRequest(
            messages=(
                ChatMessage.user("A1001 到哪了？"),
                ChatMessage.assistant("", tool_calls=(call,)),
                ChatMessage.tool(call, '{"status": "已发货"}'),
            ),
            tools=(ORDER_TOOL,),
        )
    )

    assert response.content == "A1001 已发货。"
    (body,) = fake_openai.chat_bodies()
    assert body["tools"] == [ORDER_TOOL.openai_format()]
    assistant, tool = body["messages"][1], body["messages"][2]
    assert assistant["tool_calls"] == [
        {
            "id": "call_7",
            "type": "function",
            "function": {"name": "get_order_status", "arguments": '{"order_id": "A1001"}'},
        }
    ]
    assert tool == {"role": "tool", "content": '{"status": "已发货"}', "tool_call_id": "call_7"}


async def test_json_schema_is_sent_as_response_format(
    fake_openai: FakeOpenAI, openai_model: OpenAICompatModel
) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    fake_openai.queue(ScriptedReply.answer('{"answer"', ': "yes"}'))
    response = await openai_model.complete(
        ChatRequest(messages=HELLO.messages, tools=(ORDER_TOOL,), json_schema=schema)
    )
    assert response.decode_json() == {"answer": "yes"}
    (body,) = fake_openai.chat_bodies()
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema},
    }
    assert "tools" not in body


# --- reading the answer -----------------------------------------------------------------------------


async def test_argument_strings_split_across_chunks_are_joined_and_decoded(
    fake_openai: FakeOpenAI, openai_model: OpenAICompatModel
) -> None:
    fake_openai.queue(
        ScriptedReply(
            tool_calls=[
                ScriptedToolCall("get_order_status", {"order_id": "A1001", "note": "加急"}, id="call_a"),
                ScriptedToolCall("get_order_status", {"order_id": "B2002"}, id="call_b"),
            ],
            argument_pieces=6,
        )
    )
    response = await openai_model.complete(ChatRequest(messages=HELLO.messages, tools=(ORDER_TOOL,)))

    assert [(c.id, c.name, c.arguments) for c in response.tool_calls] == [
        ("call_a", "get_order_status", {"order_id": "A1001", "note": "加急"}),
        ("call_b", "get_order_status", {"order_id": "B2002"}),
    ]
    assert response.finish_reason == "tool_calls"
    assert response.content == ""


async def test_empty_argument_string_means_no_arguments(
    fake_openai: FakeOpenAI, openai_model: OpenAICompatModel
) -> None:
    fake_openai.queue(ScriptedReply(tool_calls=[ScriptedToolCall("handoff_to_human", raw_arguments="")]))
    response = await openai_model.complete(HELLO)
    assert [(c.name, c.arguments) for c in response.tool_calls] == [("handoff_to_human", {})]


@pytest.mark.parametrize("raw", ['{"order_id": "A10', '["A1001"]'])
async def test_arguments_that_are_not_a_json_object_raise_model_output_error(
    fake_openai: FakeOpenAI, openai_model: OpenAICompatModel, raw: str
) -> None:
    fake_openai.queue(ScriptedReply(tool_calls=[ScriptedToolCall("get_order_status", raw_arguments=raw)]))
    with pytest.raises(ModelOutputError, match="get_order_status"):
        await openai_model.complete(ChatRequest(messages=HELLO.messages, tools=(ORDER_TOOL,)))


async def test_usage_comes_from_the_last_chunk_with_cached_tokens(
    fake_openai: FakeOpenAI, openai_model: OpenAICompatModel
) -> None:
    fake_openai.queue(ScriptedReply.answer("ok", prompt_tokens=900, completion_tokens=4, cached_tokens=768))
    response = await openai_model.complete(HELLO)
    assert response.usage.model_dump() == {"prompt_tokens": 900, "completion_tokens": 4, "cached_tokens": 768}
    assert response.model == OPENAI_MODEL


# --- failures ---------------------------------------------------------------------------------------


async def test_unknown_model_raises_model_not_found(openai_model: OpenAICompatModel) -> None:
    with pytest.raises(ModelNotFound, match="qwen9"):
        await openai_model.complete(HELLO.model_copy(update={"model": "qwen9"}))


@pytest.mark.parametrize("status", [503, 429])
async def test_busy_server_raises_model_overloaded(
    fake_openai: FakeOpenAI, openai_model: OpenAICompatModel, status: int
) -> None:
    fake_openai.queue(ScriptedReply.failure(status, "too many pending requests"))
    with pytest.raises(ModelOverloaded, match="too many pending"):
        await openai_model.complete(HELLO)


async def test_other_http_errors_raise_llm_error_with_the_reason(
    fake_openai: FakeOpenAI, openai_model: OpenAICompatModel
) -> None:
    fake_openai.queue(ScriptedReply.failure(400, "This model's maximum context length is 32768 tokens."))
    with pytest.raises(LLMError, match="maximum context length") as caught:
        await openai_model.complete(HELLO)
    assert not isinstance(caught.value, ModelUnavailable | ModelNotFound)


async def test_error_event_mid_stream_raises_llm_error_after_the_deltas(
    fake_openai: FakeOpenAI, openai_model: OpenAICompatModel
) -> None:
    fake_openai.queue(ScriptedReply(text=["Hel", "lo"], error="CUDA out of memory"))
    seen: list[str] = []
    with pytest.raises(LLMError, match="CUDA out of memory"):
        async for chunk in openai_model.stream(HELLO):
            seen.append(chunk.delta)
    assert seen == ["Hel", "lo"]


async def test_refused_connection_raises_model_unavailable(refused_url: str) -> None:
    model = OpenAICompatModel(base_url=f"{refused_url}/v1", model=OPENAI_MODEL, timeout=5)
    try:
        with pytest.raises(ModelUnavailable):
            await model.complete(HELLO)
        info = await model.info()
        assert not info.reachable
    finally:
        await model.aclose()


async def test_slow_server_raises_model_timeout(fake_openai: FakeOpenAI) -> None:
    model = OpenAICompatModel(base_url=fake_openai.base_url, model=OPENAI_MODEL, timeout=0.2)
    fake_openai.queue(ScriptedReply.answer("late", delay=10))
    try:
        with pytest.raises(ModelTimeout):
            await model.complete(HELLO)
    finally:
        await model.aclose()


async def test_stalled_stream_raises_model_timeout(fake_openai: FakeOpenAI) -> None:
    model = OpenAICompatModel(base_url=fake_openai.base_url, model=OPENAI_MODEL, timeout=0.2)
    fake_openai.queue(ScriptedReply.answer("first", "second", chunk_delay=10))
    try:
        with pytest.raises(ModelTimeout):
            await model.complete(HELLO)
    finally:
        await model.aclose()


# --- info() -----------------------------------------------------------------------------------------


async def test_info_reports_the_served_model_and_its_context(openai_model: OpenAICompatModel) -> None:
    info = await openai_model.info()
    assert info.reachable and info.loaded
    assert info.backend == "openai" and info.model == OPENAI_MODEL
    assert info.context_length == 32768


async def test_info_lists_what_the_server_serves_instead(fake_openai: FakeOpenAI) -> None:
    model = OpenAICompatModel(base_url=fake_openai.base_url, model="qwen9", timeout=5)
    try:
        info = await model.info()
    finally:
        await model.aclose()
    assert info.reachable and not info.loaded
    assert info.context_length is None
    assert OPENAI_MODEL in info.detail
