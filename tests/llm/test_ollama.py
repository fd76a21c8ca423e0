"""Ollama backend: what goes on the wire, how answers are read back, how failures are reported."""

from __future__ import annotations

import logging

import pytest

from core.errors import (
    LLMError,
    ModelNotFound,
    ModelOutputError,
    ModelOverloaded,
    ModelTimeout,
    ModelUnavailable,
)
from core.llm.base import ChatChunk, ChatMessage, ChatRequest, ToolCall, ToolSpec
from core.llm.ollama import OllamaModel
from tests.llm.conftest import NUM_CTX, OLLAMA_MODEL
from tests.llm.fake_ollama import FakeOllama, FakeOllamaModel
from tests.llm.scripted import ScriptedReply, ScriptedToolCall

HELLO = ChatRequest(messages=(ChatMessage.system("Be brief."), ChatMessage.user("你好")))
ORDER_TOOL = ToolSpec(
    name="get_order_status",
    description="Shipping status of an order.",
    parameters={"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
)


async def collect(model: OllamaModel, request: ChatRequest) -> list[ChatChunk]:
    return [chunk async for chunk in model.stream(request)]


# --- what kefu sends -------------------------------------------------------------------------------


async def test_every_request_carries_num_ctx_temperature_and_num_predict(
    fake_ollama: FakeOllama, ollama_model: OllamaModel
) -> None:
    fake_ollama.queue(ScriptedReply.answer("a"), ScriptedReply.answer("b"))
    await ollama_model.complete(HELLO)
    await ollama_model.complete(HELLO.model_copy(update={"temperature": 0.0, "max_tokens": 64}))

    first, second = fake_ollama.chat_bodies()
    assert first["options"] == {"num_ctx": NUM_CTX, "temperature": 0.3, "num_predict": 512}
    assert second["options"] == {"num_ctx": NUM_CTX, "temperature": 0.0, "num_predict": 64}
    assert first["model"] == OLLAMA_MODEL
    assert first["keep_alive"] == "30m"
    assert first["stream"] is True
    assert first["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好"},
    ]


async def test_tools_and_tool_history_use_ollama_forms(
    fake_ollama: FakeOllama, ollama_model: OllamaModel
) -> None:
    fake_ollama.queue(ScriptedReply.answer("A1001 has shipped."))
    call = ToolCall(id="call_1", name="get_order_status", arguments={"order_id": "A1001"})
    request = ChatRequest(
        messages=(
            ChatMessage.user("Where is A1001?"),
            ChatMessage.assistant("", tool_calls=(call,)),
            ChatMessage.tool(call, '{"status": "shipped"}'),
        ),
        tools=(ORDER_TOOL,),
    )
    response = await ollama_model.complete(request)

    assert response.content == "A1001 has shipped."
    (body,) = fake_ollama.chat_bodies()
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_order_status",
                "description": "Shipping status of an order.",
                "parameters": ORDER_TOOL.parameters,
            },
        }
    ]
    assistant, tool = body["messages"][1], body["messages"][2]
    assert assistant["tool_calls"] == [
        {"function": {"name": "get_order_status", "arguments": {"order_id": "A1001"}}}
    ]
    assert tool == {"role": "tool", "content": '{"status": "shipped"}', "tool_name": "get_order_status"}


async def test_json_schema_is_sent_as_format_and_tools_are_withheld(
    fake_ollama: FakeOllama, ollama_model: OllamaModel
) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    fake_ollama.queue(ScriptedReply.answer('{"answer": "yes"}'))
    response = await ollama_model.complete(
        ChatRequest(messages=HELLO.messages, tools=(ORDER_TOOL,), json_schema=schema)
    )
    assert response.decode_json() == {"answer": "yes"}
    (body,) = fake_ollama.chat_bodies()
    assert body["format"] == schema
    assert not body.get("tools")  # the ollama client always sends a (here empty) list


async def test_request_can_name_another_model(fake_ollama: FakeOllama, ollama_model: OllamaModel) -> None:
    fake_ollama.models["qwen2.5:1.5b"] = FakeOllamaModel()
    fake_ollama.queue(ScriptedReply.answer("summary"))
    response = await ollama_model.complete(HELLO.model_copy(update={"model": "qwen2.5:1.5b"}))
    assert response.model == "qwen2.5:1.5b"
    assert fake_ollama.chat_bodies()[0]["options"]["num_ctx"] == NUM_CTX


# --- reading the answer -----------------------------------------------------------------------------


async def test_tool_calls_in_non_final_chunks_are_collected(
    fake_ollama: FakeOllama, ollama_model: OllamaModel
) -> None:
    fake_ollama.queue(
        ScriptedReply(
            text=["Let me check. "],
            tool_calls=[
                ScriptedToolCall("get_order_status", {"order_id": "A1001"}),
                ScriptedToolCall("get_order_status", {"order_id": "B2002"}),
            ],
        )
    )
    chunks = await collect(ollama_model, ChatRequest(messages=HELLO.messages, tools=(ORDER_TOOL,)))

    assert [c.delta for c in chunks if not c.done] == ["Let me check. "]
    response = chunks[-1].response
    assert response is not None
    assert [(c.name, c.arguments) for c in response.tool_calls] == [
        ("get_order_status", {"order_id": "A1001"}),
        ("get_order_status", {"order_id": "B2002"}),
    ]
    assert len({c.id for c in response.tool_calls}) == 2
    assert response.finish_reason == "tool_calls"


async def test_usage_and_done_reason_come_from_the_final_chunk(
    fake_ollama: FakeOllama, ollama_model: OllamaModel
) -> None:
    fake_ollama.queue(
        ScriptedReply.answer("a", "b", prompt_tokens=321, completion_tokens=2, finish_reason="length")
    )
    response = await ollama_model.complete(HELLO)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (321, 2)
    assert response.finish_reason == "length"
    assert not response.truncated


async def test_prompt_reaching_num_ctx_is_flagged_as_truncated(
    fake_ollama: FakeOllama, ollama_model: OllamaModel, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ollama.queue(
        ScriptedReply.answer("fits", prompt_tokens=NUM_CTX - 1),
        ScriptedReply.answer("cut", prompt_tokens=NUM_CTX),
    )
    with caplog.at_level(logging.WARNING, logger="core.llm.ollama"):
        fits = await ollama_model.complete(HELLO)
        assert not fits.truncated
        assert not caplog.records
        cut = await ollama_model.complete(HELLO)
    assert cut.truncated
    assert cut.content == "cut"
    assert any("num_ctx" in record.getMessage() for record in caplog.records)


async def test_count_tokens_uses_the_injected_tokenizer(fake_ollama: FakeOllama) -> None:
    model = OllamaModel(host=fake_ollama.url, model=OLLAMA_MODEL, num_ctx=NUM_CTX, timeout=5, tokenizer=len)
    try:
        assert model.count_tokens("你好世界") == 4
    finally:
        await model.aclose()


# --- failures ---------------------------------------------------------------------------------------


async def test_unknown_model_raises_model_not_found(ollama_model: OllamaModel) -> None:
    with pytest.raises(ModelNotFound, match="qwen9"):
        await ollama_model.complete(HELLO.model_copy(update={"model": "qwen9"}))


async def test_scripted_404_raises_model_not_found(
    fake_ollama: FakeOllama, ollama_model: OllamaModel
) -> None:
    fake_ollama.queue(ScriptedReply.failure(404, f"model '{OLLAMA_MODEL}' not found"))
    with pytest.raises(ModelNotFound):
        await ollama_model.complete(HELLO)


async def test_full_queue_503_raises_model_overloaded(
    fake_ollama: FakeOllama, ollama_model: OllamaModel
) -> None:
    fake_ollama.queue(
        ScriptedReply.failure(503, "server busy, please try again.  maximum pending requests exceeded")
    )
    with pytest.raises(ModelOverloaded, match="busy"):
        await ollama_model.complete(HELLO)


async def test_other_http_errors_raise_llm_error_with_the_reason(
    fake_ollama: FakeOllama, ollama_model: OllamaModel
) -> None:
    fake_ollama.queue(ScriptedReply.failure(500, "llama runner process has terminated: exit status 2"))
    with pytest.raises(LLMError, match="runner process has terminated") as caught:
        await ollama_model.complete(HELLO)
    assert not isinstance(caught.value, ModelNotFound | ModelUnavailable)


async def test_tool_call_parse_failure_raises_model_output_error(
    fake_ollama: FakeOllama, ollama_model: OllamaModel
) -> None:
    fake_ollama.queue(
        ScriptedReply.failure(500, "error parsing tool call: raw='{\"name\": ', err=unexpected end")
    )
    with pytest.raises(ModelOutputError):
        await ollama_model.complete(HELLO)


async def test_error_line_mid_stream_raises_llm_error_after_the_deltas(
    fake_ollama: FakeOllama, ollama_model: OllamaModel
) -> None:
    fake_ollama.queue(
        ScriptedReply(text=["Hel", "lo"], error="an error was encountered while running the model")
    )
    seen: list[str] = []
    with pytest.raises(LLMError, match="error was encountered") as caught:
        async for chunk in ollama_model.stream(HELLO):
            seen.append(chunk.delta)
    assert seen == ["Hel", "lo"]
    assert not isinstance(caught.value, ModelNotFound)


async def test_refused_connection_raises_model_unavailable(refused_url: str) -> None:
    model = OllamaModel(host=refused_url, model=OLLAMA_MODEL, num_ctx=NUM_CTX, timeout=5)
    try:
        with pytest.raises(ModelUnavailable):
            await model.complete(HELLO)
        info = await model.info()
        assert not info.reachable
        assert refused_url in info.detail
    finally:
        await model.aclose()


async def test_slow_server_raises_model_timeout(fake_ollama: FakeOllama) -> None:
    model = OllamaModel(host=fake_ollama.url, model=OLLAMA_MODEL, num_ctx=NUM_CTX, timeout=0.2)
    fake_ollama.queue(ScriptedReply.answer("late", delay=10))
    try:
        with pytest.raises(ModelTimeout):
            await model.complete(HELLO)
    finally:
        await model.aclose()


async def test_stalled_stream_raises_model_timeout(fake_ollama: FakeOllama) -> None:
    model = OllamaModel(host=fake_ollama.url, model=OLLAMA_MODEL, num_ctx=NUM_CTX, timeout=0.2)
    fake_ollama.queue(ScriptedReply.answer("first", "second", chunk_delay=10))
    seen: list[str] = []
    try:
        with pytest.raises(ModelTimeout):
            async for chunk in model.stream(HELLO):
                seen.append(chunk.delta)
        assert seen == ["first"]
    finally:
        await model.aclose()


# --- info() -----------------------------------------------------------------------------------------


async def test_info_reports_loaded_model_and_modelfile_num_ctx(ollama_model: OllamaModel) -> None:
    info = await ollama_model.info()
    assert info.reachable and info.loaded
    assert info.backend == "ollama" and info.model == OLLAMA_MODEL
    assert info.context_length == 8192
    assert "differs" not in info.detail


async def test_info_reports_a_modelfile_num_ctx_that_differs(fake_ollama: FakeOllama) -> None:
    fake_ollama.models["kefu-qwen2.5:latest"] = FakeOllamaModel(num_ctx=4096, loaded=False)
    model = OllamaModel(host=fake_ollama.url, model=OLLAMA_MODEL, num_ctx=8192, timeout=5)
    try:
        info = await model.info()
    finally:
        await model.aclose()
    assert info.reachable and not info.loaded
    assert info.context_length == 4096
    assert "Modelfile num_ctx: 4096" in info.detail
    assert "num_ctx sent with every request: 8192" in info.detail
    assert "differs" in info.detail


async def test_info_falls_back_to_trained_context_and_flags_a_too_large_num_ctx(
    fake_ollama: FakeOllama,
) -> None:
    fake_ollama.models["kefu-qwen2.5:latest"] = FakeOllamaModel(num_ctx=None, context_length=32768)
    model = OllamaModel(host=fake_ollama.url, model=OLLAMA_MODEL, num_ctx=65536, timeout=5)
    try:
        info = await model.info()
    finally:
        await model.aclose()
    assert info.context_length == 32768
    assert "exceeds the model's trained context" in info.detail


async def test_info_says_when_the_model_is_not_pulled(fake_ollama: FakeOllama) -> None:
    fake_ollama.models.clear()
    model = OllamaModel(host=fake_ollama.url, model=OLLAMA_MODEL, num_ctx=NUM_CTX, timeout=5)
    try:
        info = await model.info()
    finally:
        await model.aclose()
    assert info.reachable and not info.loaded
    assert info.context_length is None
    assert "not on the server" in info.detail
