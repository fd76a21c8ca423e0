"""A local OpenAI-compatible server (as vLLM serves it) speaking the real wire format, scripted by tests.

Endpoints under ``/v1``: ``POST /chat/completions`` (SSE ``data: {...}`` chunks ending with
``data: [DONE]`` when ``stream`` is true, one ``chat.completion`` object otherwise) and ``GET /models``.
Like vLLM it answers 404 for an unknown model and 400 for tool-call arguments that are not strings or a
tool message without ``tool_call_id``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web

from tests.llm.scripted import JSON_BODY, ScriptedReply, ScriptedServer, split_text


def _error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


class FakeOpenAI(ScriptedServer):
    """Scripted OpenAI-compatible server. ``models`` maps served model ids to ``max_model_len``."""

    def __init__(self, models: dict[str, int] | None = None) -> None:
        super().__init__()
        self.models = models if models is not None else {"Qwen/Qwen2.5-7B-Instruct": 32768}

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat),
            web.get("/v1/models", self.list_models),
        ]

    @staticmethod
    def _error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
        return web.json_response(_error_body(status, message, kind), status=status)

    def _invalid(self, body: dict[str, Any]) -> str | None:
        for message in body.get("messages", []):
            for call in message.get("tool_calls") or []:
                if not isinstance(call.get("function", {}).get("arguments"), str):
                    return "messages.tool_calls.function.arguments: Input should be a valid string"
            if message.get("role") == "tool" and not message.get("tool_call_id"):
                return "messages.tool_call_id: Field required"
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = request[JSON_BODY]
        name = body.get("model", "")
        if name not in self.models:
            return self._error(404, f"The model `{name}` does not exist.", "NotFoundError")
        if (problem := self._invalid(body)) is not None:
            return self._error(400, problem)
        reply = self.next_reply(body)
        if reply is None:
            return self._error(500, "fake openai: no scripted reply queued", "InternalServerError")
        await self.pause(reply.delay)
        if reply.status != 200:
            return self._error(reply.status, reply.error or "error", "ServiceUnavailableError")
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, name, reply, include_usage)
        return web.json_response(self._completion(name, reply))

    @staticmethod
    def _finish(reply: ScriptedReply) -> str:
        return reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")

    @staticmethod
    def _usage(reply: ScriptedReply) -> dict[str, Any]:
        return {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
        }

    @staticmethod
    def _call_id(index: int, reply: ScriptedReply) -> str:
        return reply.tool_calls[index].id or f"chatcmpl-tool-{uuid.uuid4().hex[:16]}"

    def _completion(self, name: str, reply: ScriptedReply) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.text) or None}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": self._call_id(index, reply),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_text()},
                }
                for index, call in enumerate(reply.tool_calls)
            ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": self._finish(reply)}
            ],
            "usage": self._usage(reply),
        }

    async def _stream(
        self, request: web.Request, name: str, reply: ScriptedReply, include_usage: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        async def event(data: dict[str, Any] | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
            await response.write(f"data: {text}\n\n".encode())
            await self.pause(reply.chunk_delay)

        async def chunk(delta: dict[str, Any], finish: str | None = None) -> None:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                data["usage"] = None
            await event(data)

        await chunk({"role": "assistant", "content": ""})
        for piece in reply.text:
            await chunk({"content": piece})
        for index, call in enumerate(reply.tool_calls):
            # The first piece names the call; the argument string follows in fragments, by index.
            await chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": self._call_id(index, reply),
                            "type": "function",
                            "function": {"name": call.name, "arguments": ""},
                        }
                    ]
                }
            )
            for fragment in split_text(call.arguments_text(), reply.argument_pieces):
                await chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
        if reply.error is not None:
            await event(_error_body(500, reply.error, "InternalServerError"))
        else:
            await chunk({}, finish=self._finish(reply))
            if include_usage:
                await event(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": name,
                        "choices": [],
                        "usage": self._usage(reply),
                    }
                )
        await event("[DONE]")
        await response.write_eof()
        return response

    async def list_models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": model_id,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "vllm",
                "root": model_id,
                "parent": None,
                "max_model_len": max_len,
            }
            for model_id, max_len in self.models.items()
        ]
        return web.json_response({"object": "list", "data": data})
