"""Fixtures for the model backend tests: scripted fake servers and backends pointed at them."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from core.llm.ollama import OllamaModel
from core.llm.openai_compat import OpenAICompatModel
from tests.llm.fake_ollama import FakeOllama
from tests.llm.fake_openai import FakeOpenAI

OLLAMA_MODEL = "kefu-qwen2.5"
OPENAI_MODEL = "Qwen/Qwen2.5-7B-Instruct"
NUM_CTX = 8192


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    server = FakeOllama()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def ollama_model(fake_ollama: FakeOllama) -> AsyncIterator[OllamaModel]:
    model = OllamaModel(host=fake_ollama.url, model=OLLAMA_MODEL, num_ctx=NUM_CTX, timeout=5.0)
    yield model
    await model.aclose()


@pytest.fixture
async def openai_model(fake_openai: FakeOpenAI) -> AsyncIterator[OpenAICompatModel]:
    model = OpenAICompatModel(base_url=fake_openai.base_url, model=OPENAI_MODEL, timeout=5.0)
    yield model
    await model.aclose()


@pytest.fixture
def refused_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
