"""The OpenAI-compatible backend: vLLM or llama.cpp's server through ``openai.AsyncOpenAI``.

Wire facts this module handles: tool-call arguments are JSON *strings* that a stream splits across
chunks by tool-call ``index`` (collected, then decoded); usage comes in a last chunk with no choices
when ``stream_options.include_usage`` is set; an error after the answer started arrives as an SSE
``data: {"error": ...}`` event.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import openai

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


@dataclass
class _PendingCall:
    """A tool call whose pieces are still arriving."""

    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class OpenAICompatModel(ChatModel):
    """A model behind an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    ``timeout`` bounds each wait on the server (connecting, the first token, the gap between chunks).
    ``max_retries`` is 0 by default: the conversation engine owns the fallback, and silent client
    retries would multiply the user's wait.
    """

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        timeout: float,
        temperature: float = 0.3,
        max_tokens: int = 512,
        tokenizer: Callable[[str], int] | None = None,
        max_retries: int = 0,
    ) -> None:
        self._base_url = base_url
        self._model = model
        self._temperature = temperature
        self._max_tokens = max_tokens
        self._tokenizer = tokenizer
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
        )

    @property
    def model(self) -> str:
        return self._model

    def _create_arguments(self, request: ChatRequest) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "model": request.model or self._model,
            "messages": [_wire_message(message) for message in request.messages],
            "temperature": self._temperature if request.temperature is None else request.temperature,
            "max_tokens": request.max_tokens or self._max_tokens,
            "stream_options": {"include_usage": True},
        }
        if request.json_schema is not None:
            # Tools are not offered with a schema-constrained answer (see ChatRequest.json_schema).
            arguments["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": request.json_schema},
            }
        elif request.tools:
            arguments["tools"] = [tool.openai_format() for tool in request.tools]
        return arguments

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Stream the answer; tool-call argument pieces are joined per index and decoded at the end."""
        arguments = self._create_arguments(request)
        model: str = arguments["model"]
        text: list[str] = []
        pending: dict[int, _PendingCall] = {}
        finish_reason: str | None = None
        usage = Usage()
        served_by: str | None = None
        try:
            chunks = await self._client.chat.completions.create(**arguments, stream=True)
            async with chunks:
                async for chunk in chunks:
                    served_by = chunk.model or served_by
                    if chunk.usage is not None:
                        details = chunk.usage.prompt_tokens_details
                        usage = Usage(
                            prompt_tokens=chunk.usage.prompt_tokens,
                            completion_tokens=chunk.usage.completion_tokens,
                            cached_tokens=(details.cached_tokens or 0) if details else 0,
                        )
                    for choice in chunk.choices[:1]:
                        delta = choice.delta
                        if delta.content:
                            text.append(delta.content)
                            yield ChatChunk(delta=delta.content)
                        for piece in delta.tool_calls or ():
                            call = pending.setdefault(piece.index, _PendingCall())
                            call.id = piece.id or call.id
                            if piece.function is not None:
                                # The name comes whole in the call's first piece; some servers repeat it.
                                call.name = call.name or piece.function.name or ""
                                call.arguments.append(piece.function.arguments or "")
                        if choice.finish_reason is not None:
                            finish_reason = choice.finish_reason
        except openai.OpenAIError as exc:
            raise self._map_error(exc, model) from exc
        except json.JSONDecodeError as exc:
            raise LLMError(f"{self._base_url} sent a stream event that is not JSON") from exc
        if finish_reason is None:
            raise ModelOutputError(f"stream from {self._base_url} ended before the answer was complete")
        tool_calls = tuple(_decode_call(pending[index]) for index in sorted(pending))
        response = ChatResponse(
            content="".join(text),
            tool_calls=tool_calls,
            usage=usage,
            finish_reason=finish_reason,
            model=served_by or model,
        )
        yield ChatChunk(done=True, response=response)

    def _map_error(self, exc: openai.OpenAIError, model: str) -> LLMError:
        """The most specific core.errors type for an openai SDK failure."""
        where = self._base_url
        if isinstance(exc, openai.APITimeoutError):
            return ModelTimeout(f"{where} did not answer in time")
        if isinstance(exc, openai.APIConnectionError):
            return ModelUnavailable(f"cannot reach {where}: {exc}")
        if isinstance(exc, openai.NotFoundError):
            return ModelNotFound(f"{where} has no model {model!r}: {exc.message}")
        if isinstance(exc, openai.APIStatusError):
            if exc.status_code in (429, 503):
                return ModelOverloaded(f"{where} is overloaded (HTTP {exc.status_code}): {exc.message}")
            return LLMError(f"{where} returned HTTP {exc.status_code}: {exc.message}")
        if isinstance(exc, openai.APIError):
            return LLMError(f"{where} failed while answering: {exc.message}")
        return LLMError(f"{where}: {type(exc).__name__}: {exc}")

    def count_tokens(self, text: str) -> int:
        """Tokens with the injected tokenizer, else the base estimate."""
        if self._tokenizer is not None:
            return self._tokenizer(text)
        return super().count_tokens(text)

    async def info(self) -> ModelInfo:
        """Reachability and whether the server serves the model (``GET /models``)."""
        try:
            page = await self._client.models.list()
        except openai.OpenAIError as exc:
            return ModelInfo(
                backend=self.name,
                model=self._model,
                reachable=False,
                detail=str(self._map_error(exc, self._model)),
            )
        served = [entry.id for entry in page.data]
        for entry in page.data:
            if entry.id == self._model:
                # vLLM reports the serving window as max_model_len; other servers may not say.
                context = (entry.model_extra or {}).get("max_model_len")
                return ModelInfo(
                    backend=self.name,
                    model=self._model,
                    reachable=True,
                    loaded=True,
                    context_length=context if isinstance(context, int) else None,
                    detail=f"served by {self._base_url}",
                )
        return ModelInfo(
            backend=self.name,
            model=self._model,
            reachable=True,
            detail=f"model {self._model!r} is not served by {self._base_url}; it serves {served}",
        )

    async def aclose(self) -> None:
        await self._client.close()


def _wire_message(message: ChatMessage) -> dict[str, Any]:
    """A ChatMessage in OpenAI's form: tool-call arguments as JSON strings, results by tool_call_id."""
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        wire["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
            }
            for call in message.tool_calls
        ]
    if message.role == "tool":
        wire["tool_call_id"] = message.tool_call_id or message.tool_name or ""
    return wire


def _decode_call(call: _PendingCall) -> ToolCall:
    """Join and decode a streamed call; arguments that are not a JSON object are a model error."""
    raw = "".join(call.arguments).strip()
    if not call.name:
        raise ModelOutputError(f"model sent a tool call without a name (arguments {raw[:200]!r})")
    try:
        arguments = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise ModelOutputError(
            f"model called tool {call.name!r} with arguments that are not JSON: {raw[:200]!r}"
        ) from exc
    if not isinstance(arguments, dict):
        raise ModelOutputError(f"model called tool {call.name!r} with non-object arguments: {raw[:200]!r}")
    return ToolCall(id=call.id or f"call_{uuid.uuid4().hex[:12]}", name=call.name, arguments=arguments)
