"""Business tools the model may call, registered from plain typed async functions.

A tool is ``async def name(ctx: ToolContext, arg: type, ...) -> result``: the name comes from
``__name__``, the description from the docstring, the JSON schema of the arguments from the signature
(``Annotated[str, Field(description=...)]`` adds per-argument descriptions). The schema is derived,
never written by hand. The registry validates the model's arguments against the same pydantic model
before the function runs, enforces a timeout, and turns every failure into a tool error the model sees.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from core.errors import ToolError
from core.llm.base import ToolCall, ToolSpec
from tools.context import ToolContext

log = logging.getLogger(__name__)

ToolFunction = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class ToolResult:
    """What a tool call produced: ``content`` is the JSON text the model sees."""

    call: ToolCall
    content: str
    ok: bool
    facts: dict[str, str] = field(default_factory=dict)
    """Key facts to pin in conversation memory (a tool returns them under the ``"pinned"`` key)."""


class Tool:
    """One registered tool: the function, its argument model and its schema."""

    def __init__(self, fn: ToolFunction, *, name: str | None = None, timeout: float = 10.0) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"tool {fn.__name__} must be an async function")
        self.fn = fn
        self.name = name or fn.__name__
        self.description = inspect.cleandoc(fn.__doc__ or "").strip() or self.name
        self.timeout = timeout
        self.arguments = _arguments_model(fn, self.name)

    @functools.cached_property
    def spec(self) -> ToolSpec:
        schema = self.arguments.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        return ToolSpec(name=self.name, description=self.description, parameters=schema)

    async def run(self, ctx: ToolContext, arguments: dict[str, Any]) -> Any:
        """Validate ``arguments`` and run the function under the timeout."""
        try:
            parsed = self.arguments.model_validate(arguments)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}" for err in exc.errors()
            )
            raise ToolError(f"invalid arguments for {self.name}: {problems}") from exc
        kwargs = {field: getattr(parsed, field) for field in type(parsed).model_fields}
        try:
            return await asyncio.wait_for(self.fn(ctx, **kwargs), timeout=self.timeout)
        except TimeoutError as exc:
            raise ToolError(f"{self.name} timed out after {self.timeout:g}s") from exc


def _arguments_model(fn: ToolFunction, name: str) -> type[BaseModel]:
    signature = inspect.signature(fn)
    hints = get_type_hints(fn, include_extras=True)
    params = list(signature.parameters.values())
    if not params or hints.get(params[0].name) is not ToolContext:
        raise TypeError(f"tool {name}: the first parameter must be `ctx: ToolContext`")
    fields: dict[str, Any] = {}
    for param in params[1:]:
        if param.name not in hints:
            raise TypeError(f"tool {name}: parameter {param.name} needs a type hint")
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (hints[param.name], default)
    return create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)


class ToolRegistry:
    """The set of tools offered to the model."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for item in tools:
            self.add(item)

    def add(self, item: Tool) -> Tool:
        if item.name in self._tools:
            raise ValueError(f"tool {item.name} is registered twice")
        self._tools[item.name] = item
        return item

    def tool(self, fn: ToolFunction | None = None, *, name: str | None = None, timeout: float = 10.0) -> Any:
        """Decorator: ``@registry.tool`` or ``@registry.tool(timeout=5)``."""

        def register(func: ToolFunction) -> ToolFunction:
            self.add(Tool(func, name=name, timeout=timeout))
            return func

        return register(fn) if fn is not None else register

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def specs(self) -> tuple[ToolSpec, ...]:
        return tuple(item.spec for item in self._tools.values())

    async def call(self, call: ToolCall, ctx: ToolContext) -> ToolResult:
        """Run one call; every failure becomes an error result for the model, never an exception."""
        item = self._tools.get(call.name)
        if item is None:
            known = ", ".join(sorted(self._tools)) or "none"
            return _error(call, f"unknown tool {call.name!r}; available tools: {known}")
        try:
            value = await item.run(ctx, call.arguments)
        except ToolError as exc:
            log.warning("tool %s failed: %s", call.name, exc, extra={"conversation": str(ctx.key)})
            return _error(call, str(exc))
        except Exception as exc:
            log.error("tool %s raised", call.name, exc_info=True, extra={"conversation": str(ctx.key)})
            return _error(call, f"{call.name} failed: {type(exc).__name__}")
        facts: dict[str, str] = {}
        if isinstance(value, dict) and isinstance(value.get("pinned"), dict):
            value = dict(value)
            facts = {str(k): str(v) for k, v in value.pop("pinned").items()}
        return ToolResult(call=call, content=_to_json(value), ok=True, facts=facts)


def _error(call: ToolCall, message: str) -> ToolResult:
    return ToolResult(call=call, content=json.dumps({"error": message}, ensure_ascii=False), ok=False)


def _to_json(value: Any) -> str:
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)
