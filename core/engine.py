"""The conversation engine: one inbound message in, one reply out (streamed or whole).

For each message, under the conversation's lock: clean and check the input, open the conversation,
update its pinned facts, read the turns not yet summarised, build the prompt under the token budget, run
the model/tool loop, persist the customer's message, every tool call and result and the answer, and
return the reply. After the reply, turns that left the window are folded into the summary in the
background. Failures are contained per message: the customer always gets an answer (a fixed apology in
their language when nothing else works) and the error is logged with the conversation.

Frequent questions can skip the wait: :meth:`Engine.from_cache` finds the FAQ cache's answer without
touching the conversation, the worker sends it at once, and :meth:`Engine.stream` with ``sent`` then
stores the turn as if it had been answered the ordinary way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from core import metrics
from core.audit import AuditLog
from core.breaker import CircuitBreaker, counts_as_outage
from core.context import ContextBuilder, split_turns
from core.conversations import ConversationStore
from core.db.database import is_outage
from core.db.models import Conversation, Message
from core.errors import DatabaseError, KefuError, LLMError, ModelOutputError
from core.faq.cache import CachedAnswer, FaqCache
from core.faq.fallback import FaqFallback, close_followup, keep_for_followup
from core.faq.learning import LearnedPhrasings
from core.guards import InputGuard, neutralize_control_tokens
from core.guards.output_guard import OutputModerator, pinned_values
from core.handoff import PAUSED_STATES, customer_request, maybe_request_human
from core.handoff_intent import wants_human
from core.llm.base import ChatMessage, ChatModel, ChatRequest, ChatResponse, ToolCall
from core.memory import add_note, extract_facts
from core.messages import (
    ConversationKey,
    InboundMessage,
    Reply,
    ReplyDelta,
    ReplyDone,
    ReplyEvent,
    ReplySource,
)
from core.sanitize import clean_text, looks_like_garbage, looks_like_tool_call
from core.stores.base import StateStore
from core.summary import Summarizer
from core.texts import text as fixed_text
from tools.context import ToolContext
from tools.registry import ToolRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    max_input_chars: int = 4000
    max_tool_rounds: int = 4
    lock_ttl: float = 30.0
    """Seconds a crashed holder keeps a conversation locked; renewed while a live holder works."""
    lock_wait: float = 300.0
    """How long a message waits behind the one being answered in the same conversation."""


DEFAULT_LIMITS = EngineLimits()


@dataclass
class _Turn:
    """What one answer accumulates before it is stored."""

    rows: list[Message]
    pinned: dict[str, Any]
    answer: str = ""
    source: ReplySource = ReplySource.MODEL
    meta: dict[str, Any] | None = None


class Engine:
    """Answers customer messages. Knows no platform: adapters translate in and out."""

    def __init__(
        self,
        *,
        conversations: ConversationStore,
        store: StateStore,
        model: ChatModel,
        tools: ToolRegistry,
        system_prompt: str,
        context: ContextBuilder,
        summarizer: Summarizer | None = None,
        guard: InputGuard | None = None,
        faq_cache: FaqCache | None = None,
        fallback: FaqFallback | None = None,
        breaker: CircuitBreaker | None = None,
        audit: AuditLog | None = None,
        moderator: OutputModerator | None = None,
        limits: EngineLimits = DEFAULT_LIMITS,
    ) -> None:
        self._conversations = conversations
        self._store = store
        self._model = model
        self._tools = tools
        self._system_prompt = system_prompt
        self._context = context
        self._summarizer = summarizer
        self._guard = guard
        self._faq_cache = faq_cache
        self._fallback = fallback
        self._breaker = breaker
        self._audit = audit
        self._moderator = moderator
        self._limits = limits
        self._background: set[asyncio.Task[Any]] = set()

    async def handle(self, message: InboundMessage) -> Reply:
        """Answer ``message`` and return the whole reply."""
        reply: Reply | None = None
        async for event in self.stream(message):
            if isinstance(event, ReplyDone):
                reply = event.reply
        assert reply is not None  # stream() always ends with ReplyDone
        return reply

    async def from_cache(self, message: InboundMessage) -> CachedAnswer | None:
        """The FAQ cache's answer to ``message`` when it needs nothing of the conversation, else None.

        No SQL: normalisation, the input guard and one store read. None for whatever an ordinary turn
        treats differently: empty or over-long input, a request for a person, input the guard does not
        simply allow. The caller sends the answer and then stores the turn with :meth:`stream`
        (``sent=``); it checks first that no person has the conversation. After a miss it passes
        ``cache_missed=True`` to :meth:`stream`, which then does not ask the cache again.
        """
        if self._faq_cache is None:
            return None
        text = clean_text(message.text)
        if not text or len(text) > self._limits.max_input_chars or wants_human(text, message.extras):
            return None
        if self._guard is not None:
            decision = self._guard.check(text)
            if decision.action != "allow":
                return None
            text = decision.text
        hit = await self._faq_cache.lookup(neutralize_control_tokens(text), message.language)
        metrics.faq_cache_lookup(hit=hit is not None)
        return hit

    def cached_reply(self, message: InboundMessage, cached: CachedAnswer) -> Reply:
        """The reply that delivers a :meth:`from_cache` answer."""
        return self._reply(message, cached.answer, ReplySource.FAQ_CACHE)

    async def stream(
        self,
        message: InboundMessage,
        *,
        raise_on_outage: bool = False,
        sent: CachedAnswer | None = None,
        cache_missed: bool = False,
    ) -> AsyncIterator[ReplyEvent]:
        """Answer ``message``, yielding text deltas as the model writes and always a final ReplyDone.

        Deltas are provisional: the ReplyDone text is what was stored and must be shown in the end.

        With ``raise_on_outage``, a database that cannot be reached raises
        :class:`~core.errors.DatabaseError` instead of ending with the apology, so the caller (the
        worker) can answer the message again once the database is back. The next attempt builds on
        what the failed one stored: the customer's message is not stored twice, a stored answer is
        reused.

        With ``sent``, that cache answer already reached the customer: the turn is stored with it (once,
        however often this is repeated) and nothing else is asked.
        """
        text = clean_text(message.text)
        if not text:
            log.info("empty message", extra=_log_extra(message))
            yield ReplyDone(reply=self._fixed(message, "empty_input"))
            return
        if len(text) > self._limits.max_input_chars:
            log.info("message over %d characters", self._limits.max_input_chars, extra=_log_extra(message))
            yield ReplyDone(reply=self._fixed(message, "input_too_long", limit=self._limits.max_input_chars))
            return
        try:
            lock = self._store.lock(
                f"lock:conversation:{message.key}", ttl=self._limits.lock_ttl, wait=self._limits.lock_wait
            )
            async with lock:
                async for event in self._answer(message, text, sent, cache_missed):
                    yield event
        except Exception as exc:
            if raise_on_outage and is_outage(exc):
                raise DatabaseError(f"database unavailable while answering ({type(exc).__name__})") from exc
            log.error("could not answer message", exc_info=True, extra=_log_extra(message))
            yield ReplyDone(reply=self._fixed(message, "apology"))

    async def is_paused(self, key: ConversationKey) -> bool:
        """True while a person has (or was asked to take) the conversation: the bot does not answer."""
        return await self._conversations.state(key) in PAUSED_STATES

    async def wait_idle(self) -> None:
        """Wait for background work (summaries, FAQ hit counts) to finish: at shutdown and in tests."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._faq_cache is not None:
            await self._faq_cache.wait_idle()

    async def _answer(
        self, message: InboundMessage, text: str, sent: CachedAnswer | None, cache_missed: bool
    ) -> AsyncIterator[ReplyEvent]:
        conversations = self._conversations
        conversation = await conversations.get_or_create(
            message.key, user_id=message.user_id, language=message.language
        )
        assert conversation.id is not None
        asked_id, previous = await conversations.previous_turn(conversation.id, message.message_id)
        if previous is not None:
            # Re-processing an answered message (a reclaimed inbox entry): same answer, no new turn.
            log.info("message answered before; reusing the stored answer", extra=_log_extra(message))
            source = ReplySource(previous.source) if previous.source else ReplySource.MODEL
            yield ReplyDone(reply=self._reply(message, previous.content, source))
            return
        history = await conversations.recent_messages(
            conversation.id,
            turns=4 * (self._context.budget.history_turns + self._context.budget.block_turns),
            after_id=conversation.summarized_upto,
        )
        if asked_id is None:
            # The customer's message is stored before the model runs: a model or process failure
            # never loses it.
            await conversations.append(
                conversation.id,
                [
                    Message(
                        conversation_id=conversation.id,
                        role="user",
                        content=text,
                        platform_message_id=message.message_id,
                    )
                ],
            )
            await self._record(
                "inbound",
                conversation.id,
                f"customer:{message.key.channel}:{message.user_id}",
                {"text": text, "message_id": message.message_id, "language": message.language},
            )
        else:
            # An earlier attempt stored the message and then failed (database outage, crash): it is
            # answered now without being stored again or shown to the model twice.
            history = [row for row in history if row.id is not None and row.id < asked_id]
        if sent is None and conversation.state in PAUSED_STATES:
            # A person has (or is about to take) the conversation: the bot stays quiet.
            log.info("conversation is with a person; no bot answer", extra=_log_extra(message))
            yield ReplyDone(reply=self._reply(message, "", ReplySource.SYSTEM))
            return
        if sent is None and wants_human(text, message.extras):
            # The customer asked for a person: no guard, no model; pause the bot and say so.
            await customer_request(
                conversations,
                conversation_id=conversation.id,
                key=message.key,
                message_id=message.message_id,
                text=text,
            )
            notice = await self._note_handoff(
                conversation.id, message, "customer", f"customer:{message.key.channel}:{message.user_id}"
            )
            yield ReplyDone(reply=self._reply(message, notice, ReplySource.SYSTEM))
            return
        turn = _Turn(rows=[], pinned=extract_facts(text, conversation.pinned))
        started = time.perf_counter()
        if sent is not None:
            turn.answer, turn.source = sent.answer, ReplySource.FAQ_CACHE
            turn.meta = {"faq_entry": sent.entry_id, "sent_first": True}
        else:
            async for delta in self._respond(message, conversation, history, text, turn, cache_missed):
                yield ReplyDelta(text=delta)
        if turn.source is ReplySource.MODEL and self._moderator is not None:
            await self._moderate(conversation.id, message, turn)
        meta = turn.meta or {}
        meta["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
        turn.rows.append(
            Message(
                conversation_id=conversation.id,
                role="assistant",
                content=turn.answer,
                source=turn.source.value,
                meta=meta,
            )
        )
        await conversations.append(conversation.id, turn.rows)
        trigger = await maybe_request_human(
            conversations,
            conversation_id=conversation.id,
            key=message.key,
            message_id=message.message_id,
            latest=turn.rows[-1],
        )
        if trigger is not None:
            notice = await self._note_handoff(conversation.id, message, trigger, "bot")
            turn.answer = f"{turn.answer}\n\n{notice}"
        if turn.pinned != conversation.pinned:
            await conversations.update(conversation.id, pinned=turn.pinned)
        await self._record(
            "answer", conversation.id, "bot", {"text": turn.answer, "source": turn.source.value, "meta": meta}
        )
        yield ReplyDone(reply=self._reply(message, turn.answer, turn.source))
        if len(split_turns(history)) + 1 >= (
            self._context.budget.history_turns + self._context.budget.block_turns
        ):
            self._fold_later(conversation.id)

    async def _note_handoff(
        self, conversation_id: int, message: InboundMessage, trigger: str, actor: str
    ) -> str:
        """Store and audit that a person was asked for; returns the notice telling the customer."""
        notice = fixed_text("handoff_waiting", message.language)
        await self._conversations.append(
            conversation_id,
            [
                Message(
                    conversation_id=conversation_id,
                    role="assistant",
                    content=notice,
                    source=ReplySource.SYSTEM.value,
                    meta={"handoff": "requested", "trigger": trigger},
                )
            ],
        )
        await self._record("handoff", conversation_id, actor, {"action": "requested", "trigger": trigger})
        return notice

    async def _respond(
        self,
        message: InboundMessage,
        conversation: Conversation,
        history: list[Message],
        text: str,
        turn: _Turn,
        cache_missed: bool,
    ) -> AsyncIterator[str]:
        """Fill ``turn`` with the answer: guard, FAQ cache, model (behind the breaker), FAQ fallback.

        ``cache_missed``: :meth:`from_cache` already asked the cache for this text as the guard allows
        it; the cache is asked again only for a text the guard changed.
        """
        assert conversation.id is not None
        language = message.language
        ask_cache = not cache_missed
        if self._guard is not None:
            decision = self._guard.check(text)
            if decision.action != "allow":
                log.info(
                    "input guard: %s (%s, rule %s)",
                    decision.action,
                    decision.category,
                    decision.rule,
                    extra=_log_extra(message),
                )
                await self._record(
                    "guard",
                    conversation.id,
                    "guard:input",
                    {"action": decision.action, "category": decision.category, "rule": decision.rule},
                )
            if decision.action == "block":
                metrics.guard_blocked(decision.category)
                turn.answer = decision.reply or fixed_text("apology", language)
                turn.source = ReplySource.SYSTEM
                turn.meta = {"guard": decision.category, "rule": decision.rule}
                return
            text = decision.text
            ask_cache = ask_cache or decision.action != "allow"
        # Chat-template control tokens typed by a customer never reach the prompt, whatever the guard said.
        text = neutralize_control_tokens(text)

        if await self._picked_suggestion(message, history, text, turn):
            return

        if self._faq_cache is not None and ask_cache:
            hit = await self._faq_cache.lookup(text, language)
            metrics.faq_cache_lookup(hit=hit is not None)
            if hit is not None:
                turn.answer, turn.source = hit.answer, ReplySource.FAQ_CACHE
                turn.meta = {"faq_entry": hit.entry_id}
                return

        if self._breaker is None or self._breaker.allow():
            built = self._context.build(
                system_prompt=self._system_prompt,
                tools=self._tools.specs(),
                pinned=turn.pinned,
                summary=conversation.summary,
                history=history,
                user_text=text,
            )
            # Streamed text passes the output moderator too: it holds back a few characters so a word or
            # a number split across chunks is never shown half-way.
            gate = (
                self._moderator.stream(customer_values=turn.pinned, language=language)
                if self._moderator
                else None
            )
            try:
                async for delta in self._run_model(message, conversation, built.messages, built.tokens, turn):
                    safe = gate.feed(delta) if gate is not None else delta
                    if safe:
                        yield safe
            except LLMError as exc:
                log.warning("model failed: %s", exc, extra=_log_extra(message))
                if self._breaker is not None:
                    if counts_as_outage(exc):
                        self._breaker.record_failure()
                    else:
                        self._breaker.record_success()
                turn.meta = {"error": type(exc).__name__}
            else:
                if self._breaker is not None:
                    self._breaker.record_success()
                turn.meta = {**(turn.meta or {}), "context_tokens": built.tokens}
                if built.input_cut:
                    turn.answer = f"{fixed_text('input_cut', language)}\n{turn.answer}"
                return
        else:
            turn.meta = {"error": "model_circuit_open"}
        await self._fall_back(message, conversation, text, turn)

    async def _moderate(self, conversation_id: int, message: InboundMessage, turn: _Turn) -> None:
        """Apply output moderation to the final model answer (the streamed text was moderated already;
        the final text replaces it on every platform)."""
        assert self._moderator is not None
        result = self._moderator.moderate(
            turn.answer, customer_values=pinned_values(turn.pinned), language=message.language
        )
        if result.action == "allow":
            return
        decision = {
            "action": result.action,
            "categories": list(result.categories),
            "rules": list(result.rules),
            "masked": result.masked_count,
        }
        log.info(
            "output moderation: %s %s", result.action, ",".join(result.categories), extra=_log_extra(message)
        )
        await self._record("guard", conversation_id, "guard:output", {**decision, "original": turn.answer})
        turn.answer = result.text
        turn.meta = {**(turn.meta or {}), "output_guard": decision}

    async def _fall_back(
        self, message: InboundMessage, conversation: Conversation, text: str, turn: _Turn
    ) -> None:
        """The model gave nothing usable: answer from the FAQ, or apologise and keep the message."""
        meta = turn.meta or {}
        if self._fallback is None:
            turn.answer, turn.source, turn.meta = (
                fixed_text("apology", message.language),
                ReplySource.SYSTEM,
                meta,
            )
            return
        answer = await self._fallback.answer(text, message.language)
        metrics.fallback_used(str(meta.get("error", "unknown")), answer.kind)
        turn.answer, turn.source = answer.text, ReplySource.FAQ_FALLBACK
        meta.update({"fallback": answer.kind, "faq_entry": answer.entry_id, "confidence": answer.confidence})
        if answer.suggested:
            # What a reply like "2" picks, and whose follow-up ticket the pick closes (any worker).
            meta.update({"suggested": list(answer.suggested), "asked": message.message_id})
        turn.meta = meta
        if answer.needs_followup:
            try:
                await keep_for_followup(
                    self._conversations.db,
                    key=message.key,
                    conversation_id=conversation.id,
                    message_id=message.message_id,
                    text=text,
                    user_id=message.user_id,
                )
            except KefuError:
                log.error(
                    "could not keep the message for follow-up", exc_info=True, extra=_log_extra(message)
                )

    async def _picked_suggestion(
        self, message: InboundMessage, history: list[Message], text: str, turn: _Turn
    ) -> bool:
        """Answer a reply like "2" to the FAQ suggestions of the previous answer; True when it was one.

        Works whether or not the model is back: the customer chose from a list they were shown.
        """
        previous = history[-1] if history else None
        if self._fallback is None or previous is None or previous.role != "assistant":
            return False
        suggested = previous.meta.get("suggested")
        if previous.meta.get("fallback") != "suggest" or not isinstance(suggested, list):
            return False
        if not all(isinstance(entry, int) for entry in suggested):
            return False
        picked = self._fallback.pick(text, suggested)
        if picked is None:
            return False
        metrics.faq_suggestion_picked()
        turn.answer, turn.source = picked.text, ReplySource.FAQ_FALLBACK
        turn.meta = {"fallback": picked.kind, "faq_entry": picked.entry_id}
        asked = previous.meta.get("asked")
        if not isinstance(asked, str):
            return True
        db = self._conversations.db
        question = next(
            (row.content for row in history if row.role == "user" and row.platform_message_id == asked), None
        )
        try:
            # The customer has an answer they chose: nobody needs to follow the question up, and their
            # wording is kept for an operator to add to the entry.
            await close_followup(db, key=message.key, message_id=asked)
            if question is not None and picked.entry_id is not None:
                await LearnedPhrasings(db=db).record_pick(
                    entry_id=picked.entry_id, question=question, pick_id=f"{message.key}:{message.message_id}"
                )
        except KefuError:
            log.error("could not file a picked suggestion", exc_info=True, extra=_log_extra(message))
        return True

    async def _record(self, kind: str, conversation_id: int | None, actor: str, data: dict[str, Any]) -> None:
        """Append to the audit log; a failing audit write is logged, never costs the customer an answer."""
        if self._audit is None:
            return
        try:
            await self._audit.record(kind, conversation_id=conversation_id, actor=actor, data=data)
        except KefuError:
            log.error(
                "audit record %s not written", kind, exc_info=True, extra={"conversation_id": conversation_id}
            )

    async def _run_model(
        self,
        message: InboundMessage,
        conversation: Conversation,
        prompt: list[ChatMessage],
        estimated_tokens: int,
        turn: _Turn,
    ) -> AsyncIterator[str]:
        """The model/tool loop; fills ``turn`` and yields answer deltas."""
        assert conversation.id is not None
        ctx = ToolContext(
            key=message.key,
            conversation_id=conversation.id,
            user_id=message.user_id,
            message_id=message.message_id,
            language=message.language,
            db=self._conversations.db,
            store=self._store,
            extras=dict(message.extras),
        )
        response: ChatResponse | None = None
        seen_calls: set[str] = set()
        repeating = False
        for round_no in range(self._limits.max_tool_rounds + 1):
            offer_tools = not repeating and round_no < self._limits.max_tool_rounds and len(self._tools) > 0
            request = ChatRequest(messages=tuple(prompt), tools=self._tools.specs() if offer_tools else ())
            response = None
            async for chunk in self._model.stream(request):
                if chunk.delta:
                    yield chunk.delta
                if chunk.done:
                    response = chunk.response
            if response is None:
                raise LLMError("model stream ended without a final response")
            self._check_context(message, response, estimated_tokens if round_no == 0 else None)
            if not response.tool_calls:
                break
            signatures = {_call_signature(c) for c in response.tool_calls}
            if signatures <= seen_calls:
                # The model asks again for what it already has: make it answer from the results.
                log.info("repeated tool call; asking for the answer", extra=_log_extra(message))
                repeating = True
                continue
            seen_calls |= signatures
            prompt.append(ChatMessage.assistant(response.content, response.tool_calls))
            turn.rows.append(
                Message(
                    conversation_id=conversation.id,
                    role="assistant",
                    content=response.content,
                    tool_calls=[c.model_dump() for c in response.tool_calls],
                )
            )
            for call in response.tool_calls:
                result = await self._tools.call(call, ctx)
                metrics.tool_called(call.name, ok=result.ok)
                await self._record(
                    "tool_call",
                    conversation.id,
                    f"tool:{call.name}",
                    {"id": call.id, "arguments": call.arguments, "ok": result.ok, "result": result.content},
                )
                for label, value in result.facts.items():
                    turn.pinned = add_note(turn.pinned, label, value)
                content = self._context.fit_tool_result(result.content, prompt=prompt, tools=request.tools)
                prompt.append(ChatMessage.tool(call, content))
                turn.rows.append(
                    Message(
                        conversation_id=conversation.id,
                        role="tool",
                        content=result.content,
                        tool_name=call.name,
                        tool_call_id=call.id,
                        meta={"ok": result.ok},
                    )
                )
        assert response is not None
        turn.answer = response.content.strip()
        turn.meta = {
            "prompt_tokens": response.usage.prompt_tokens,
            "completion_tokens": response.usage.completion_tokens,
            "cached_tokens": response.usage.cached_tokens,
            "truncated": response.truncated,
        }
        if response.tool_calls or looks_like_garbage(turn.answer) or looks_like_tool_call(turn.answer):
            log.warning("model gave no usable answer", extra=_log_extra(message))
            raise ModelOutputError("no usable answer")

    def _check_context(self, message: InboundMessage, response: ChatResponse, estimated: int | None) -> None:
        if response.truncated:
            log.error(
                "the model server cut the prompt (context full): answers may ignore the system prompt",
                extra=_log_extra(message),
            )
        actual = response.usage.prompt_tokens
        if estimated and actual > estimated * 1.1 + 16:
            log.warning(
                "prompt took %d tokens on the server, %d estimated: raise the safety margin",
                actual,
                estimated,
                extra=_log_extra(message),
            )

    def _fold_later(self, conversation_id: int) -> None:
        if self._summarizer is None:
            return
        summarizer = self._summarizer
        keep = self._context.budget.history_turns

        async def fold() -> None:
            marker = f"summarizing:{conversation_id}"
            # One fold per conversation at a time across processes.
            if not await self._store.set_if_absent(marker, "1", ttl=300):
                return
            try:
                await summarizer.fold(conversation_id, keep_turns=keep)
            except Exception:
                log.error("summary failed", exc_info=True, extra={"conversation_id": conversation_id})
            finally:
                await self._store.delete(marker)

        task = asyncio.create_task(fold(), name=f"summary:{conversation_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _reply(self, message: InboundMessage, answer: str, source: ReplySource) -> Reply:
        return Reply(
            key=message.key,
            text=answer,
            language=message.language,
            in_reply_to=message.message_id,
            source=source,
            extras=dict(message.extras),
        )

    def _fixed(self, message: InboundMessage, name: str, **values: object) -> Reply:
        return self._reply(message, fixed_text(name, message.language, **values), ReplySource.SYSTEM)


def _call_signature(call: ToolCall) -> str:
    return call.name + json.dumps(call.arguments, sort_keys=True, ensure_ascii=False)


def _log_extra(message: InboundMessage) -> dict[str, str]:
    return {"conversation": str(message.key), "message_id": message.message_id}
