"""Neutralising chat-template control tokens that a user types into a message.

A user must never be able to open a ``system`` turn or fake a tool call by typing the template's own
markers. Each marker is rewritten with visible look-alike characters that no tokenizer maps to a special
token and no template parser recognises, while a person reading the transcript still sees what was typed:

    <|im_start|>  → ‹ǀim_startǀ›      (ChatML / Qwen; also <|endoftext|>, <|eot_id|>, <|system|>, ...)
    <｜tool▁begin｜> → ‹ǀtool▁beginǀ›  (DeepSeek's full-width form)
    [INST] [/INST] → ⁅INST⁆ ⁅/INST⁆    (Llama 2 / Mistral)
    <<SYS>>        → ‹‹SYS››
    <tool_call>    → ‹tool_call›        (Qwen / Hermes tool calls; also <s>, </s>, <start_of_turn>, ...)
"""

from __future__ import annotations

import re

_LT = "<\uff1c\ufe64\u2329\u3008"
_GT = ">\uff1e\ufe65\u232a\u3009"
_BAR = "|\uff5c\u01c0\u2223"

# <|anything|> with ASCII or full-width brackets and bars, spaces allowed inside: "< | im_start | >".
_PIPE_TOKEN = re.compile(f"[{_LT}]\\s*[{_BAR}]\\s*([^{_LT}{_GT}{_BAR}\\n]{{1,40}}?)\\s*[{_BAR}]\\s*[{_GT}]")
# A lone half of such a token ("<|" or "|>") can be completed by text that follows the message.
_PIPE_HALF = re.compile(f"[{_LT}]\\s*[{_BAR}]|[{_BAR}]\\s*[{_GT}]")
_INST = re.compile(r"\[\s*(/?)\s*(INST|SYS|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS)\s*\]", re.I)
_SYS = re.compile(f"[{_LT}]\\s*[{_LT}]\\s*(/?)\\s*SYS\\s*[{_GT}]\\s*[{_GT}]", re.I)
_TAG_NAMES = (
    "tool_call|tool_response|tool_calls|tools|function_call|functions?|tool|think|"
    "s|bos|eos|pad|unk|start_of_turn|end_of_turn|start_of_text|end_of_text|"
    "im_start|im_end|system|user|assistant|endoftext|eot_id|bot|eom_id|"
    "start_header_id|end_header_id|begin_of_text|end_of_text|fim_prefix|fim_middle|fim_suffix"
)
_TAG = re.compile(f"[{_LT}]\\s*(/?)\\s*({_TAG_NAMES})\\s*(/?)\\s*[{_GT}]", re.I)


def _pipe(match: re.Match[str]) -> str:
    return f"\u2039\u01c0{match.group(1).strip()}\u01c0\u203a"


def _half(match: re.Match[str]) -> str:
    return match.group().translate(_HALF_TABLE)


_HALF_TABLE = str.maketrans(
    {**dict.fromkeys(_LT, "\u2039"), **dict.fromkeys(_GT, "\u203a"), **dict.fromkeys(_BAR, "\u01c0")}
)


def neutralize_control_tokens(text: str) -> str:
    """``text`` with every chat-template control marker made inert (see the module docstring)."""
    text = _PIPE_TOKEN.sub(_pipe, text)
    text = _PIPE_HALF.sub(_half, text)
    text = _SYS.sub(lambda m: f"\u2039\u2039{m.group(1)}SYS\u203a\u203a", text)
    text = _INST.sub(lambda m: f"\u2045{m.group(1)}{m.group(2)}\u2046", text)
    return _TAG.sub(lambda m: f"\u2039{m.group(1)}{m.group(2)}{m.group(3)}\u203a", text)
