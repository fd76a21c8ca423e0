"""The prompt for one turn, built under a token budget.

Layout, stable parts first so consecutive turns share the longest prefix and the model server can reuse
its KV cache:

    system prompt (+ tool definitions, rendered by the server's template)
    [MEMORY] pinned facts            — always present, survives summaries
    summary of older turns           — changes only when a block of turns is folded into it
    recent turns, verbatim           — at least ``history_turns``; grows until a block is folded
    the new customer message

Budget: ``num_ctx`` minus room for the answer and a safety margin. History that does not fit is dropped
oldest-first in blocks (so the prefix stays stable between drops); if even the protected recent turns do
not fit, long tool results in them are shortened; a single oversized input is cut and flagged so the
reply can say so. The prompt never exceeds the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.db.models import Message
from core.llm.base import ChatMessage, ToolSpec
from core.memory import render_memory
from core.prompt import history_to_chat
from core.tokens import MESSAGE_OVERHEAD, TokenCounter, count_message, count_prompt

log = logging.getLogger(__name__)

TRUNCATED = " …[truncated]"


@dataclass(frozen=True)
class ContextBudget:
    num_ctx: int = 8192
    answer_tokens: int = 512
    history_turns: int = 6
    """Turns always kept verbatim (KEFU_HISTORY_TURNS)."""
    block_turns: int = 6
    """History is dropped/folded this many turns at a time, so prompts change in blocks."""
    safety_ratio: float = 0.05
    """Share of num_ctx kept free for tokenizer/template differences with the server."""

    @property
    def prompt_limit(self) -> int:
        return int(self.num_ctx * (1 - self.safety_ratio)) - self.answer_tokens


@dataclass(frozen=True)
class BuiltContext:
    messages: list[ChatMessage]
    tokens: int
    """Estimated prompt tokens (tools included)."""
    turns_included: int
    turns_dropped: int
    input_cut: bool


def split_turns(rows: Sequence[Message]) -> list[list[Message]]:
    """Group stored messages into turns: a customer message and everything after it."""
    turns: list[list[Message]] = []
    for row in rows:
        if row.role == "user" or not turns:
            turns.append([row])
        else:
            turns[-1].append(row)
    return turns


class ContextBuilder:
    """Builds prompts for one model: its tokenizer and its budget."""

    def __init__(self, *, counter: TokenCounter, budget: ContextBudget) -> None:
        self.counter = counter
        self.budget = budget

    def build(
        self,
        *,
        system_prompt: str,
        tools: Sequence[ToolSpec],
        pinned: Mapping[str, Any],
        summary: str,
        history: Sequence[Message],
        user_text: str,
    ) -> BuiltContext:
        limit = self.budget.prompt_limit
        head = [ChatMessage.system(system_prompt)]
        context_text = _context_block(pinned, summary)
        if context_text:
            head.append(ChatMessage.system(context_text))
        fixed = count_prompt(head, tools, self.counter)
        if fixed > limit:
            # Pinned facts and summary are bounded; only an enormous summary gets here.
            memory = render_memory(pinned)
            head = [head[0], ChatMessage.system(memory)] if memory else head[:1]
            fixed = count_prompt(head, tools, self.counter)
        if fixed > limit:
            raise ValueError(f"system prompt and tools alone take {fixed} tokens, over the {limit} budget")

        user_text, input_cut = self._fit_input(user_text, limit - fixed)
        user_message = ChatMessage.user(user_text)
        room = limit - fixed - count_message(user_message, self.counter)

        turns = [history_to_chat(turn) for turn in split_turns(history)]
        turns = [t for t in turns if t]
        costs = [sum(count_message(m, self.counter) for m in turn) for turn in turns]
        start = self._first_turn(costs, room)
        kept = turns[start:]
        kept_cost = sum(costs[start:])
        if kept_cost > room:
            kept = self._shrink(kept, room)
        messages = [*head, *(m for turn in kept for m in turn), user_message]
        tokens = count_prompt(messages, tools, self.counter)
        if start:
            log.info("context: dropped %d old turns to fit %d tokens", start, limit)
        return BuiltContext(
            messages=messages,
            tokens=tokens,
            turns_included=len(kept),
            turns_dropped=start,
            input_cut=input_cut,
        )

    def fit_tool_result(
        self, content: str, *, prompt: Sequence[ChatMessage], tools: Sequence[ToolSpec]
    ) -> str:
        """A tool result cut to what the prompt has room for (at most a quarter of the budget)."""
        limit = self.budget.prompt_limit
        room = limit - count_prompt(prompt, tools, self.counter) - 2 * MESSAGE_OVERHEAD
        cap = min(limit // 4, room)
        if self.counter(content) <= cap:
            return content
        if cap < 32:
            return '{"error": "the result is too large for the remaining context"}'
        low, high = 0, len(content)
        while low < high:
            mid = (low + high + 1) // 2
            if self.counter(content[:mid] + TRUNCATED) <= cap:
                low = mid
            else:
                high = mid - 1
        return content[:low] + TRUNCATED

    def _first_turn(self, costs: Sequence[int], room: int) -> int:
        """Index of the oldest turn to keep: a multiple of the block size, as early as fits.

        Only whole blocks are dropped, so the kept history starts at the same turn from one message to
        the next until another block must go. The last ``history_turns`` are never dropped here.
        """
        protected_from = max(0, len(costs) - self.budget.history_turns)
        block = max(1, self.budget.block_turns)
        start = 0
        while start < protected_from and sum(costs[start:]) > room:
            start = min(start + block, protected_from)
        return start

    def _shrink(self, turns: list[list[ChatMessage]], room: int) -> list[list[ChatMessage]]:
        """Make the protected recent turns fit: shorten the longest messages (tool results first),
        then, as a last resort, drop the oldest turns."""
        turns = [list(t) for t in turns]

        def total() -> int:
            return sum(count_message(m, self.counter) for t in turns for m in t)

        while total() > room:
            candidates = [(ti, mi) for ti, t in enumerate(turns) for mi, _ in enumerate(t)]
            ti, mi = max(
                candidates,
                key=lambda p: (turns[p[0]][p[1]].role == "tool", len(turns[p[0]][p[1]].content)),
            )
            message = turns[ti][mi]
            if len(message.content) <= 200:
                if len(turns) == 1:
                    return []
                turns.pop(0)
                continue
            over = total() - room
            keep_chars = max(100, len(message.content) - max(over * 2, len(message.content) // 4))
            turns[ti][mi] = message.model_copy(update={"content": message.content[:keep_chars] + TRUNCATED})
        return turns

    def _fit_input(self, text: str, room: int) -> tuple[str, bool]:
        """Cut a single oversized message to what fits (at most half of the room left)."""
        limit = (
            max(16, room // 2) if count_message(ChatMessage.user(text), self.counter) > room // 2 else None
        )
        if limit is None:
            return text, False
        low, high = 0, len(text)
        while low < high:
            mid = (low + high + 1) // 2
            if self.counter(text[:mid] + TRUNCATED) + 5 <= limit:
                low = mid
            else:
                high = mid - 1
        return text[:low] + TRUNCATED, True


def _context_block(pinned: Mapping[str, Any], summary: str) -> str:
    parts = [render_memory(pinned)]
    if summary.strip():
        parts.append("[SUMMARY] Earlier in this conversation / 之前的对话摘要:\n" + summary.strip())
    return "\n\n".join(p for p in parts if p)
