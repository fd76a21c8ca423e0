"""Fixtures for the entry points: settings on a temporary SQLite database, the gateway with a
FunctionModel (no inference), and a real uvicorn server for wire-level WebSocket tests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.testclient import TestClient

from bots.gateway import create_app
from core.llm.base import ChatRequest, ModelInfo
from core.llm.testing import FunctionModel
from core.runtime import Runtime
from core.settings import Settings, load_settings


def last_user_text(request: ChatRequest) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            return message.content
    return ""


def answer(request: ChatRequest) -> str:
    """A multi-word answer naming the question, so streaming yields several deltas."""
    return f"您好，关于「{last_user_text(request)}」: here is the answer."


class SwitchableModel(FunctionModel):
    """A FunctionModel whose server can be 'down' (info() reports unreachable)."""

    def __init__(self) -> None:
        super().__init__(answer)
        self.reachable = True

    async def info(self) -> ModelInfo:
        return ModelInfo(backend="function", model="function", reachable=self.reachable, loaded=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'kefu.db'}"


@pytest.fixture
def settings(db_url: str) -> Settings:
    """Embedded defaults on a temporary database, no Redis, no .env file."""
    return load_settings(_env_file=None, database_url=db_url, redis_url=None)


@pytest.fixture
def model() -> SwitchableModel:
    return SwitchableModel()


@pytest.fixture
def client(settings: Settings, model: SwitchableModel) -> Iterator[TestClient]:
    """The gateway with its lifespan running (runtime open) behind starlette's TestClient."""
    with TestClient(create_app(settings, model=model)) as test_client:
        yield test_client


def runtime_of(app: Starlette) -> Runtime:
    runtime = app.state.runtime
    assert isinstance(runtime, Runtime)
    return runtime


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI sets up root logging; put pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@dataclass
class LiveServer:
    app: Starlette
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def runtime(self) -> Runtime:
        return runtime_of(self.app)


@contextlib.asynccontextmanager
async def live_server(settings: Settings, model: FunctionModel) -> AsyncIterator[LiveServer]:
    """The gateway on a real uvicorn server in this event loop, on a free port."""
    app = create_app(settings, model=model)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped during start-up")
            await asyncio.sleep(0.02)
        yield LiveServer(app=app, port=port)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)
