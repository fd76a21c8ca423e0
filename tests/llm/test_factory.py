"""build_model(): the KEFU_LLM_BACKEND setting picks the backend, configured from the settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.llm.base import ChatMessage, ChatRequest
from core.llm.factory import build_model
from core.llm.ollama import OllamaModel
from core.llm.openai_compat import OpenAICompatModel
from core.settings import Settings
from tests.llm.fake_ollama import FakeOllama
from tests.llm.fake_openai import FakeOpenAI
from tests.llm.scripted import ScriptedReply

HELLO = ChatRequest(messages=(ChatMessage.user("hi"),))


async def test_ollama_backend_uses_the_configured_host_model_and_limits(fake_ollama: FakeOllama) -> None:
    settings = Settings(
        llm_backend="ollama",
        ollama_host=fake_ollama.url,
        ollama_model="kefu-qwen2.5",
        ollama_keep_alive="1h",
        num_ctx=4096,
        temperature=0.1,
        max_answer_tokens=256,
    )
    fake_ollama.queue(ScriptedReply.answer("hello"))
    async with build_model(settings) as model:
        assert isinstance(model, OllamaModel)
        assert (await model.complete(HELLO)).content == "hello"
    (body,) = fake_ollama.chat_bodies()
    assert body["model"] == "kefu-qwen2.5"
    assert body["keep_alive"] == "1h"
    assert body["options"] == {"num_ctx": 4096, "temperature": 0.1, "num_predict": 256}


async def test_openai_backend_uses_the_configured_server_and_key(fake_openai: FakeOpenAI) -> None:
    settings = Settings(
        llm_backend="openai",
        openai_base_url=fake_openai.base_url,
        openai_model="Qwen/Qwen2.5-7B-Instruct",
        openai_api_key="sk-local",
        max_answer_tokens=300,
    )
    fake_openai.queue(ScriptedReply.answer("hello"))
    async with build_model(settings) as model:
        assert isinstance(model, OpenAICompatModel)
        assert (await model.complete(HELLO)).content == "hello"
    (body,) = fake_openai.chat_bodies()
    assert body["model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert body["max_tokens"] == 300


def test_llamacpp_backend_reports_a_missing_model_file(tmp_path: Path) -> None:
    settings = Settings(llm_backend="llamacpp", llamacpp_model_path=tmp_path / "missing.gguf")
    with pytest.raises(ConfigError, match="KEFU_LLAMACPP_MODEL_PATH"):
        build_model(settings)
