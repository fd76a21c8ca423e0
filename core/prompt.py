"""Building the model prompt from the system prompt, stored history and the new input.

Order is fixed so consecutive turns share the longest prefix (KV-cache reuse on Ollama/llama.cpp):
system prompt first, then history oldest to newest, then the new customer message.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from core.db.models import Message
from core.guards.control_tokens import neutralize_control_tokens
from core.llm.base import ChatMessage, ToolCall


def load_system_prompt(path: Path | None = None) -> str:
    """The operator's system prompt file, or the one shipped in ``core/prompts/system.txt``."""
    if path is not None:
        return path.read_text(encoding="utf-8").strip()
    return resources.files("core.prompts").joinpath("system.txt").read_text(encoding="utf-8").strip()


HISTORY_TOOL_RESULT_CHARS = 300


def compact_tool_result(content: str) -> str:
    """A tool result as later turns see it: the model read it in full when it was fresh, its key facts
    are pinned, so history keeps only its beginning. A turn's text never changes as it ages, which keeps
    prompt prefixes stable."""
    if len(content) <= HISTORY_TOOL_RESULT_CHARS:
        return content
    return content[:HISTORY_TOOL_RESULT_CHARS] + " …"


def history_to_chat(rows: Sequence[Message]) -> list[ChatMessage]:
    """Stored messages as prompt messages (agent replies count as assistant turns; earlier tool results
    are compacted)."""
    out: list[ChatMessage] = []
    for row in rows:
        if row.role == "user":
            out.append(ChatMessage.user(neutralize_control_tokens(row.content)))
        elif row.role in ("assistant", "agent"):
            calls = tuple(ToolCall.model_validate(c) for c in row.tool_calls or ())
            out.append(ChatMessage.assistant(row.content, calls))
        elif row.role == "tool":
            out.append(
                ChatMessage(
                    role="tool",
                    content=compact_tool_result(row.content),
                    tool_name=row.tool_name,
                    tool_call_id=row.tool_call_id,
                )
            )
    return _drop_orphan_tool_results(out)


def _drop_orphan_tool_results(messages: list[ChatMessage]) -> list[ChatMessage]:
    """A window may start after a tool call; its results alone would confuse the model."""
    while messages and messages[0].role == "tool":
        messages.pop(0)
    return messages


def build_prompt(*, system_prompt: str, history: Sequence[Message], user_text: str) -> list[ChatMessage]:
    return [
        ChatMessage.system(system_prompt),
        *history_to_chat(history),
        ChatMessage.user(user_text),
    ]
