"""A local Ollama server speaking the real wire format, scripted by tests.

Endpoints: ``POST /api/chat`` (NDJSON stream when ``stream`` is true or absent, one JSON object when
false), ``POST /api/show``, ``GET /api/ps``, ``GET /api/tags``, ``GET /api/version``.
Like the real server it answers 404 ``{"error": "model '...' not found"}`` for an unknown model and
rejects tool-call arguments that are not JSON objects with 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.llm.scripted import JSON_BODY, ScriptedReply, ScriptedServer

VERSION = "0.12.6"


@dataclass
class FakeOllamaModel:
    """A model the fake server has: Modelfile ``num_ctx`` (None = not set) and its trained context."""

    num_ctx: int | None = 8192
    context_length: int = 32768
    loaded: bool = True
    loaded_context: int | None = 8192


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _full_name(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


class FakeOllama(ScriptedServer):
    """Scripted Ollama. ``models`` maps full names (``name:tag``) to their details."""

    def __init__(self, models: dict[str, FakeOllamaModel] | None = None) -> None:
        super().__init__()
        self.models = models if models is not None else {"kefu-qwen2.5:latest": FakeOllamaModel()}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/api/chat", self.chat),
            web.post("/api/show", self.show),
            web.get("/api/ps", self.ps),
            web.get("/api/tags", self.tags),
            web.get("/api/version", self.version),
        ]

    def _model(self, name: str | None) -> FakeOllamaModel | None:
        return self.models.get(_full_name(name or ""))

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = request[JSON_BODY]
        name = body.get("model", "")
        if self._model(name) is None:
            return self._error(404, f"model '{name}' not found")
        for message in body.get("messages", []):
            for call in message.get("tool_calls") or []:
                if not isinstance(call.get("function", {}).get("arguments"), dict):
                    return self._error(
                        400,
                        "json: cannot unmarshal string into Go struct field ChatRequest.messages."
                        "tool_calls.function.arguments of type api.ToolCallFunctionArguments",
                    )
        reply = self.next_reply(body)
        if reply is None:
            return self._error(500, "fake ollama: no scripted reply queued")
        await self.pause(reply.delay)
        if reply.status != 200:
            return self._error(reply.status, reply.error or "error")
        if body.get("stream", True):
            return await self._stream(request, name, reply)
        return web.json_response(self._final(name, reply, content="".join(reply.text), with_calls=True))

    def _final(self, name: str, reply: ScriptedReply, *, content: str, with_calls: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if with_calls and reply.tool_calls:
            message["tool_calls"] = self._calls(reply)
        return {
            "model": name,
            "created_at": _now(),
            "message": message,
            "done": True,
            "done_reason": reply.finish_reason or "stop",
            "total_duration": 1_200_000_000,
            "load_duration": 10_000_000,
            "prompt_eval_count": reply.prompt_tokens,
            "prompt_eval_duration": 300_000_000,
            "eval_count": reply.completion_tokens,
            "eval_duration": 800_000_000,
        }

    @staticmethod
    def _calls(reply: ScriptedReply) -> list[dict[str, Any]]:
        return [
            {"function": {"index": index, "name": call.name, "arguments": call.arguments}}
            for index, call in enumerate(reply.tool_calls)
        ]

    async def _stream(self, request: web.Request, name: str, reply: ScriptedReply) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)

        async def line(obj: dict[str, Any]) -> None:
            await response.write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")
            await self.pause(reply.chunk_delay)

        def part(message: dict[str, Any]) -> dict[str, Any]:
            return {"model": name, "created_at": _now(), "message": message, "done": False}

        for piece in reply.text:
            await line(part({"role": "assistant", "content": piece}))
        if reply.tool_calls:
            # Real Ollama sends tool calls in a non-final chunk; the final one has only the counts.
            await line(part({"role": "assistant", "content": "", "tool_calls": self._calls(reply)}))
        if reply.error is not None:
            await line({"error": reply.error})
        else:
            await line(self._final(name, reply, content="", with_calls=False))
        await response.write_eof()
        return response

    async def show(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = request[JSON_BODY] or {}
        name = body.get("model") or body.get("name") or ""
        model = self._model(name)
        if model is None:
            return self._error(404, f"model '{name}' not found")
        parameters = [
            'stop                           "<|im_start|>"',
            'stop                           "<|im_end|>"',
        ]
        if model.num_ctx is not None:
            parameters.insert(0, f"num_ctx                        {model.num_ctx}")
        return web.json_response(
            {
                "license": "Apache License 2.0",
                "modelfile": f"FROM {name}\nPARAMETER num_ctx {model.num_ctx}\n",
                "parameters": "\n".join(parameters),
                "template": "{{ .System }}{{ .Prompt }}",
                "details": self._details(),
                "model_info": {
                    "general.architecture": "qwen2",
                    "general.parameter_count": 7615616512,
                    "qwen2.context_length": model.context_length,
                    "qwen2.embedding_length": 3584,
                },
                "capabilities": ["completion", "tools"],
                "modified_at": _now(),
            }
        )

    @staticmethod
    def _details() -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": "qwen2",
            "families": ["qwen2"],
            "parameter_size": "7.6B",
            "quantization_level": "Q4_K_M",
        }

    async def ps(self, request: web.Request) -> web.Response:
        running = [
            {
                "name": name,
                "model": name,
                "size": 6_000_000_000,
                "digest": "845dbda0ea48ed749caafd9e6037047aa19acfcfd82e704d7ca97d631a0b697e",
                "details": self._details(),
                "expires_at": "2030-01-01T00:00:00Z",
                "size_vram": 6_000_000_000,
                "context_length": model.loaded_context,
            }
            for name, model in self.models.items()
            if model.loaded
        ]
        return web.json_response({"models": running})

    async def tags(self, request: web.Request) -> web.Response:
        listed = [
            {
                "name": name,
                "model": name,
                "modified_at": _now(),
                "size": 4_683_087_332,
                "digest": "845dbda0ea48ed749caafd9e6037047aa19acfcfd82e704d7ca97d631a0b697e",
                "details": self._details(),
            }
            for name in self.models
        ]
        return web.json_response({"models": listed})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})
