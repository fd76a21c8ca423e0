"""The Ollama backend: ``POST /api/chat`` through the official ``ollama`` client.

Ollama facts this module is built around:

* ``options.num_ctx`` is sent with every request. Ollama's default window is small and a longer prompt is
  cut from the FRONT (system prompt and tool definitions first) with only a debug log; a
  ``prompt_eval_count`` that reaches ``num_ctx`` is therefore reported as ``truncated=True``.
* Tool-call arguments are JSON objects, and when streaming, tool calls arrive in non-final chunks.
* Errors: a missing model is HTTP 404, a full queue HTTP 503, and a failure after the answer started is
  an ``{"error": ...}`` NDJSON line after status 200.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
import pydantic

import ollama
from core.errors import (
    LLMError,
    ModelNotFound,
    ModelOutputError,
    ModelOverloaded,
    ModelTimeout,
    ModelUnavailable,
)
from core.llm.base import (
    ChatChunk,
    ChatMessage,
    ChatModel,
    ChatRequest,
    ChatResponse,
    ModelInfo,
    ToolCall,
    Usage,
)

logger = logging.getLogger(__name__)

# Errors the ollama client lets through unchanged; everything here is mapped to core.errors.
_CLIENT_ERRORS = (
    ollama.ResponseError,
    httpx.HTTPError,
    ConnectionError,
    json.JSONDecodeError,
    pydantic.ValidationError,
)


class OllamaModel(ChatModel):
    """A model served by Ollama.

    ``timeout`` bounds each wait on the server (connecting, the first token, the gap between two
    chunks), so a long answer that keeps streaming is not cut, while a stalled server is.
    """

    name = "ollama"

    def __init__(
        self,
        *,
        host: str,
        model: str,
        num_ctx: int,
        timeout: float,
        keep_alive: str = "30m",
        temperature: float = 0.3,
        max_tokens: int = 512,
        tokenizer: Callable[[str], int] | None = None,
    ) -> None:
        if num_ctx < 1:
            raise ValueError("num_ctx must be positive")
        self._host = host
        self._model = model
        self._num_ctx = num_ctx
        self._keep_alive = keep_alive
        self._temperature = temperature
        self._max_tokens = max_tokens
        self._tokenizer = tokenizer
        self._client = ollama.AsyncClient(host=host, timeout=timeout)

    @property
    def model(self) -> str:
        return self._model

    @property
    def num_ctx(self) -> int:
        return self._num_ctx

    def _chat_arguments(self, request: ChatRequest) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "model": request.model or self._model,
            "messages": [_wire_message(message) for message in request.messages],
            "options": {
                "num_ctx": self._num_ctx,
                "temperature": self._temperature if request.temperature is None else request.temperature,
                "num_predict": request.max_tokens or self._max_tokens,
            },
            "keep_alive": self._keep_alive,
        }
        if request.json_schema is not None:
            # Tools are not offered with a schema-constrained answer (see ChatRequest.json_schema).
            arguments["format"] = request.json_schema
        elif request.tools:
            arguments["tools"] = [tool.openai_format() for tool in request.tools]
        return arguments

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Stream the answer; tool calls from any chunk are collected into the final response."""
        arguments = self._chat_arguments(request)
        model = arguments["model"]
        text: list[str] = []
        tool_calls: list[ToolCall] = []
        final: ollama.ChatResponse | None = None
        parts: AsyncIterator[ollama.ChatResponse] | None = None
        try:
            parts = await self._client.chat(**arguments, stream=True)
            async for part in parts:
                message = part.message
                if message.content:
                    text.append(message.content)
                    yield ChatChunk(delta=message.content)
                for call in message.tool_calls or ():
                    tool_calls.append(
                        ToolCall(
                            id=f"call_{uuid.uuid4().hex[:12]}",
                            name=call.function.name,
                            arguments=dict(call.function.arguments),
                        )
                    )
                if part.done:
                    final = part
                    break
        except _CLIENT_ERRORS as exc:
            raise self._map_error(exc, model) from exc
        finally:
            # Close the HTTP stream even when the caller stops iterating early.
            aclose = getattr(parts, "aclose", None)
            if aclose is not None:
                await aclose()
        if final is None:
            raise ModelOutputError(f"ollama stream for {model!r} ended before the final chunk")
        yield ChatChunk(done=True, response=self._response(final, "".join(text), tool_calls, model))

    def _response(
        self, final: ollama.ChatResponse, content: str, tool_calls: list[ToolCall], model: str
    ) -> ChatResponse:
        prompt_tokens = final.prompt_eval_count or 0
        truncated = prompt_tokens >= self._num_ctx
        if truncated:
            logger.warning(
                "ollama prompt reached num_ctx: the server cut the start of the prompt "
                "(system prompt, tools); reduce the context budget or raise num_ctx",
                extra={"model": model, "prompt_tokens": prompt_tokens, "num_ctx": self._num_ctx},
            )
        return ChatResponse(
            content=content,
            tool_calls=tuple(tool_calls),
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=final.eval_count or 0),
            finish_reason="tool_calls" if tool_calls else final.done_reason,
            truncated=truncated,
            model=final.model or model,
        )

    def _map_error(self, exc: BaseException, model: str) -> LLMError:
        """The most specific core.errors type for an ollama/httpx failure."""
        if isinstance(exc, ollama.ResponseError):
            reason = str(exc.error)
            status = exc.status_code
            lowered = reason.lower()
            # Older servers answer a missing model with 400 "model ... not found, try pulling it first".
            if status == 404 or ("model" in lowered and "not found" in lowered):
                return ModelNotFound(f"ollama at {self._host} has no model {model!r}: {reason}")
            if status in (429, 503):
                return ModelOverloaded(f"ollama at {self._host} is overloaded (HTTP {status}): {reason}")
            if "tool call" in lowered:
                return ModelOutputError(f"ollama could not parse the model's tool call: {reason}")
            if status == -1:
                # The client reports an {"error": ...} line after status 200 with status -1.
                return LLMError(f"ollama failed while answering: {reason}")
            return LLMError(f"ollama returned HTTP {status}: {reason}")
        if isinstance(exc, httpx.ConnectTimeout):
            # No TCP connection at all: the server is unreachable rather than slow.
            return ModelUnavailable(f"cannot connect to ollama at {self._host} (connect timeout)")
        if isinstance(exc, httpx.TimeoutException):
            return ModelTimeout(f"ollama at {self._host} did not answer in time ({type(exc).__name__})")
        if isinstance(exc, httpx.TransportError | ConnectionError):
            return ModelUnavailable(f"cannot reach ollama at {self._host}: {type(exc).__name__} {exc}")
        return LLMError(f"ollama sent a reply kefu cannot read: {type(exc).__name__}: {exc}")

    def count_tokens(self, text: str) -> int:
        """Tokens with the injected tokenizer, else the base estimate."""
        if self._tokenizer is not None:
            return self._tokenizer(text)
        return super().count_tokens(text)

    async def info(self) -> ModelInfo:
        """Reachability, whether the model is pulled and loaded, and its context sizes."""
        try:
            tags = await self._client.list()
        except _CLIENT_ERRORS as exc:
            return ModelInfo(
                backend=self.name,
                model=self._model,
                reachable=False,
                detail=str(self._map_error(exc, self._model)),
            )
        if not any(_same_model(entry.model, self._model) for entry in tags.models):
            return ModelInfo(
                backend=self.name,
                model=self._model,
                reachable=True,
                detail=f"model {self._model!r} is not on the server: ollama pull/create it",
            )
        notes: list[str] = [f"num_ctx sent with every request: {self._num_ctx}"]
        modelfile_ctx: int | None = None
        trained_ctx: int | None = None
        try:
            show = await self._client.show(self._model)
            modelfile_ctx = _modelfile_num_ctx(show.parameters)
            trained_ctx = _trained_context_length(show.modelinfo)
        except _CLIENT_ERRORS as exc:
            notes.append(f"model details unavailable: {self._map_error(exc, self._model)}")
        loaded = False
        try:
            for running in (await self._client.ps()).models:
                if _same_model(running.model or running.name, self._model):
                    loaded = True
                    if running.context_length:
                        notes.append(f"loaded with context {running.context_length}")
        except _CLIENT_ERRORS as exc:
            notes.append(f"running models unavailable: {self._map_error(exc, self._model)}")
        if modelfile_ctx is not None:
            notes.append(f"Modelfile num_ctx: {modelfile_ctx}")
            if modelfile_ctx != self._num_ctx:
                notes.append(
                    "Modelfile num_ctx differs from the configured num_ctx: clients that rely on the "
                    "Modelfile default make ollama reload the model"
                )
        if trained_ctx is not None:
            notes.append(f"model trained context: {trained_ctx}")
            if self._num_ctx > trained_ctx:
                notes.append("configured num_ctx exceeds the model's trained context")
        return ModelInfo(
            backend=self.name,
            model=self._model,
            reachable=True,
            loaded=loaded,
            context_length=modelfile_ctx if modelfile_ctx is not None else trained_ctx,
            detail="; ".join(notes),
        )

    async def aclose(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]  # untyped in ollama 0.6


def _wire_message(message: ChatMessage) -> dict[str, Any]:
    """A ChatMessage in Ollama's form: tool-call arguments as objects, tool results with tool_name."""
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        wire["tool_calls"] = [
            {"function": {"name": call.name, "arguments": call.arguments}} for call in message.tool_calls
        ]
    if message.role == "tool" and message.tool_name:
        wire["tool_name"] = message.tool_name
    return wire


def _same_model(listed: str | None, configured: str) -> bool:
    """Ollama lists ``name:latest`` for a model configured as plain ``name``."""

    def full(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"

    return listed is not None and full(listed) == full(configured)


def _modelfile_num_ctx(parameters: str | None) -> int | None:
    """``PARAMETER num_ctx N`` from /api/show's ``parameters`` text (``key<spaces>value`` lines)."""
    for line in (parameters or "").splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "num_ctx":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


def _trained_context_length(model_info: Mapping[str, Any] | None) -> int | None:
    """``<architecture>.context_length`` from /api/show's ``model_info``."""
    for key, value in (model_info or {}).items():
        if key.endswith(".context_length") and isinstance(value, int):
            return value
    return None
