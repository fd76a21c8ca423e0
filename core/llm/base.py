"""The one model interface every backend implements.

A backend turns a :class:`ChatRequest` (typed messages, tool specs, an optional JSON schema for the
answer) into a :class:`ChatResponse`, or streams :class:`ChatChunk` objects whose last one carries the
whole response. Backends map their transport errors to the ``LLMError`` subtree of ``core.errors``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import ModelOutputError

Role = Literal["system", "user", "assistant", "tool"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ToolCall(_Frozen):
    """A call the model asks for; ``arguments`` is always a decoded JSON object."""

    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ChatMessage(_Frozen):
    """One message of a prompt. Tool results carry ``tool_name`` and ``tool_call_id``."""

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_name: str | None = None
    tool_call_id: str | None = None

    @classmethod
    def system(cls, content: str) -> ChatMessage:
        return cls(role="system", content=content)

    @classmethod
    def user(cls, content: str) -> ChatMessage:
        return cls(role="user", content=content)

    @classmethod
    def assistant(cls, content: str, tool_calls: tuple[ToolCall, ...] = ()) -> ChatMessage:
        return cls(role="assistant", content=content, tool_calls=tool_calls)

    @classmethod
    def tool(cls, call: ToolCall, content: str) -> ChatMessage:
        return cls(role="tool", content=content, tool_name=call.name, tool_call_id=call.id)


class ToolSpec(_Frozen):
    """A tool the model may call: name, description and a JSON schema for its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]

    def openai_format(self) -> dict[str, Any]:
        """The ``{"type": "function", "function": {...}}`` form used by Ollama and OpenAI."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class ChatRequest(_Frozen):
    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...] = ()
    json_schema: dict[str, Any] | None = None
    """When set, the answer's content must be JSON matching this schema (tools are then not offered)."""
    temperature: float | None = None
    max_tokens: int | None = None
    model: str | None = None
    """Override the backend's default model (e.g. a lighter model for summaries)."""


class Usage(_Frozen):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the server reused from its KV cache, when it says."""


class ChatResponse(_Frozen):
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage = Usage()
    finish_reason: str | None = None
    truncated: bool = False
    """The server cut the prompt (Ollama: prompt_eval_count reached num_ctx)."""
    model: str | None = None

    def decode_json(self) -> Any:
        """The content decoded as JSON (for requests with ``json_schema``)."""
        try:
            return json.loads(self.content)
        except json.JSONDecodeError as exc:
            raise ModelOutputError(f"model answer is not JSON: {self.content[:200]!r}") from exc


class ChatChunk(_Frozen):
    """A streamed piece: text deltas, then a final chunk with ``done=True`` and the full response."""

    delta: str = ""
    done: bool = False
    response: ChatResponse | None = None


class ModelInfo(_Frozen):
    """What ``kefu check`` reports about a backend."""

    backend: str
    model: str
    reachable: bool
    loaded: bool = False
    context_length: int | None = None
    detail: str = ""


class ChatModel(ABC):
    """A chat-completion backend. Use it as an async context manager to open/close its resources."""

    name: str = "model"

    @abstractmethod
    def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Yield text deltas as they come; the last chunk has ``done=True`` and the full response."""

    async def complete(self, request: ChatRequest) -> ChatResponse:
        """The whole response at once (collects :meth:`stream`)."""
        async for chunk in self.stream(request):
            if chunk.done and chunk.response is not None:
                return chunk.response
        raise ModelOutputError("model stream ended without a final chunk")

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes with the serving model's tokenizer (rough estimate by default)."""
        return max(1, len(text.encode("utf-8")) // 3)

    async def info(self) -> ModelInfo:
        return ModelInfo(backend=self.name, model="?", reachable=True)

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to close by default
        """Release clients, threads and loaded weights."""

    async def __aenter__(self) -> ChatModel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
