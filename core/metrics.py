"""Prometheus metrics of a kefu process, in one registry of their own.

Everything is registered in :data:`REGISTRY` (not prometheus-client's global one): ``GET /metrics``
exposes exactly kefu's metrics plus the process's CPU/memory, and tests read values with
``REGISTRY.get_sample_value(name, labels)``. Code that handles messages calls the small functions below
(one line at each place); values that live elsewhere are read when Prometheus scrapes:

==================================================  ======================================================
``kefu_messages_received_total{channel,outcome}``   platform messages accepted (new/duplicate/limited)
``kefu_messages_sent_total{channel,source}``        replies delivered (model/faq_cache/faq_fallback/system)
``kefu_reply_latency_seconds{channel}``             platform message received → reply delivered
``kefu_model_call_seconds{outcome}``                one model call (ok/error), streaming included
``kefu_model_tokens_total{kind}``                   prompt / completion / cached prompt tokens
``kefu_model_errors_total{error}``                  model failures by error class
``kefu_tool_calls_total{tool}``                     tool calls; ``kefu_tool_errors_total{tool}`` failures
``kefu_faq_cache_lookups_total{result}``            FAQ cache hit / miss
``kefu_fallbacks_total{reason,answer}``             answers from the FAQ fallback (model down/unusable):
                                                    answer = faq / suggest / unknown
``kefu_faq_suggestions_picked_total``               FAQ suggestions a customer picked by number
``kefu_guard_blocks_total{category}``               messages the input guard refused
``kefu_circuit_breaker_state{breaker,state}``       1 for the breaker's current state (scrape time)
``kefu_circuit_breaker_opened_total{breaker}``      how often the breaker opened
``kefu_inbox_depth``                                entries waiting or in progress (scrape time)
``kefu_inbox_dead_letters``                         dead letters (from the ``inbox_stats`` job)
``kefu_inbox_reclaimed_total``                      entries taken over from a stalled worker
``kefu_inbox_dead_lettered_total``                  entries given up on by this process
``kefu_job_runs_total{job}``                        scheduled job runs in this process (the leader);
                                                    ``kefu_job_failures_total``, ``kefu_job_missed_total``
``kefu_job_duration_seconds{job}``                  how long each run took
``kefu_job_last_run_timestamp_seconds{job}``        last run by any leader (shared store, scrape time);
                                                    ``..._last_success_timestamp_seconds``,
                                                    ``kefu_job_last_run_ok``
``kefu_scheduler_leader``                           1 in the process that runs the jobs
==================================================  ======================================================

:class:`MeteredModel` wraps a model backend and records every call (duration, tokens, errors) without a
line in the engine. :func:`serve_metrics` exposes the registry from a process without the gateway.

Counters are per process: sum them across processes in PromQL. Values read from the shared store
(job status, dead letters) are the same in every process: take ``max``.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.breaker import BreakerState, CircuitBreaker
from core.errors import LLMError
from core.llm.base import ChatChunk, ChatModel, ChatRequest, ModelInfo, Usage

__all__ = [
    "REGISTRY",
    "MeteredModel",
    "dead_lettered",
    "fallback_used",
    "faq_cache_lookup",
    "faq_suggestion_picked",
    "guard_blocked",
    "inbox_reclaimed",
    "message_received",
    "model_call",
    "model_error",
    "observe_inbox",
    "observe_job_statuses",
    "reply_sent",
    "serve_metrics",
    "tool_called",
    "track_breaker",
]

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# WeChat gives up after 5 s; customers of the other platforms after a few tens of seconds.
_REPLY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 4.5, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0)
_MODEL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 60.0, 120.0)
_JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0)

MESSAGES_RECEIVED = Counter(
    "kefu_messages_received", "Platform messages accepted.", ["channel", "outcome"], registry=REGISTRY
)
MESSAGES_SENT = Counter("kefu_messages_sent", "Replies delivered.", ["channel", "source"], registry=REGISTRY)
REPLY_LATENCY = Histogram(
    "kefu_reply_latency_seconds",
    "From receiving a platform message to delivering its reply.",
    ["channel"],
    buckets=_REPLY_BUCKETS,
    registry=REGISTRY,
)
MODEL_CALL_SECONDS = Histogram(
    "kefu_model_call_seconds",
    "Duration of one model call.",
    ["outcome"],
    buckets=_MODEL_BUCKETS,
    registry=REGISTRY,
)
MODEL_TOKENS = Counter("kefu_model_tokens", "Model tokens by kind.", ["kind"], registry=REGISTRY)
MODEL_ERRORS = Counter(
    "kefu_model_errors", "Failed model calls by error class.", ["error"], registry=REGISTRY
)
TOOL_CALLS = Counter("kefu_tool_calls", "Tool calls made for the model.", ["tool"], registry=REGISTRY)
TOOL_ERRORS = Counter("kefu_tool_errors", "Tool calls that failed.", ["tool"], registry=REGISTRY)
FAQ_CACHE_LOOKUPS = Counter("kefu_faq_cache_lookups", "FAQ cache lookups.", ["result"], registry=REGISTRY)
FALLBACKS = Counter(
    "kefu_fallbacks",
    "Answers given by the FAQ fallback instead of the model.",
    ["reason", "answer"],
    registry=REGISTRY,
)
FAQ_PICKS = Counter(
    "kefu_faq_suggestions_picked", "FAQ suggestions a customer picked by number.", registry=REGISTRY
)
GUARD_BLOCKS = Counter(
    "kefu_guard_blocks", "Messages the input guard refused.", ["category"], registry=REGISTRY
)
INBOX_DEPTH = Gauge("kefu_inbox_depth", "Inbox entries waiting or in progress.", registry=REGISTRY)
INBOX_DEAD_LETTERS = Gauge("kefu_inbox_dead_letters", "Messages in the dead-letter list.", registry=REGISTRY)
INBOX_RECLAIMED = Counter(
    "kefu_inbox_reclaimed", "Inbox entries taken over from a stalled worker.", registry=REGISTRY
)
INBOX_DEAD_LETTERED = Counter(
    "kefu_inbox_dead_lettered", "Inbox entries moved to dead letters.", registry=REGISTRY
)
JOB_RUNS = Counter("kefu_job_runs", "Scheduled job runs in this process.", ["job"], registry=REGISTRY)
JOB_FAILURES = Counter("kefu_job_failures", "Scheduled job runs that failed.", ["job"], registry=REGISTRY)
JOB_MISSED = Counter(
    "kefu_job_missed", "Scheduled runs skipped (too late or still running).", ["job"], registry=REGISTRY
)
JOB_DURATION = Histogram(
    "kefu_job_duration_seconds",
    "Duration of scheduled job runs.",
    ["job"],
    buckets=_JOB_BUCKETS,
    registry=REGISTRY,
)
JOB_LAST_RUN = Gauge(
    "kefu_job_last_run_timestamp_seconds",
    "When the job last finished (any process).",
    ["job"],
    registry=REGISTRY,
)
JOB_LAST_SUCCESS = Gauge(
    "kefu_job_last_success_timestamp_seconds",
    "When the job last finished without error (any process).",
    ["job"],
    registry=REGISTRY,
)
JOB_LAST_OK = Gauge(
    "kefu_job_last_run_ok", "1 when the job's last run succeeded.", ["job"], registry=REGISTRY
)
SCHEDULER_LEADER = Gauge(
    "kefu_scheduler_leader", "1 while this process runs the scheduled jobs.", registry=REGISTRY
)


# --- calls from the message path ----------------------------------------------------------------------


def message_received(channel: str, outcome: str = "new") -> None:
    """A platform message reached the intake: ``outcome`` is ``new``, ``duplicate`` or ``limited``."""
    MESSAGES_RECEIVED.labels(channel=channel, outcome=outcome).inc()


def reply_sent(channel: str, source: str, received_at: datetime | None = None) -> None:
    """A reply went out; ``received_at`` (the inbound message's) gives the end-to-end latency."""
    MESSAGES_SENT.labels(channel=channel, source=source).inc()
    if received_at is not None:
        REPLY_LATENCY.labels(channel=channel).observe(max(0.0, time.time() - received_at.timestamp()))


def model_call(seconds: float, usage: Usage | None = None, *, ok: bool = True) -> None:
    """One model call took ``seconds``; ``usage`` adds its token counts."""
    MODEL_CALL_SECONDS.labels(outcome="ok" if ok else "error").observe(seconds)
    if usage is not None:
        MODEL_TOKENS.labels(kind="prompt").inc(usage.prompt_tokens)
        MODEL_TOKENS.labels(kind="completion").inc(usage.completion_tokens)
        MODEL_TOKENS.labels(kind="cached").inc(usage.cached_tokens)


def model_error(error: BaseException | str) -> None:
    """A model call failed; labelled by error class (``ModelTimeout``, ``ModelUnavailable``...)."""
    MODEL_ERRORS.labels(error=error if isinstance(error, str) else type(error).__name__).inc()


def tool_called(tool: str, *, ok: bool) -> None:
    """A tool call finished."""
    TOOL_CALLS.labels(tool=tool).inc()
    if not ok:
        TOOL_ERRORS.labels(tool=tool).inc()


def faq_cache_lookup(*, hit: bool) -> None:
    """The FAQ cache was asked before the model."""
    FAQ_CACHE_LOOKUPS.labels(result="hit" if hit else "miss").inc()


def fallback_used(reason: str, answer: str) -> None:
    """The FAQ fallback answered: ``reason`` why the model did not (error class or ``model_circuit_open``),
    ``answer`` what the fallback gave (``faq``, ``suggest`` or ``unknown``)."""
    FALLBACKS.labels(reason=reason, answer=answer).inc()


def faq_suggestion_picked() -> None:
    """A customer answered the fallback's FAQ suggestions with a number."""
    FAQ_PICKS.inc()


def guard_blocked(category: str | None) -> None:
    """The input guard refused a message."""
    GUARD_BLOCKS.labels(category=category or "unknown").inc()


def inbox_reclaimed(count: int) -> None:
    """``count`` entries were taken over from a stalled worker."""
    if count:
        INBOX_RECLAIMED.inc(count)


def dead_lettered() -> None:
    """This process gave up on an inbox entry."""
    INBOX_DEAD_LETTERED.inc()


class MeteredModel(ChatModel):
    """``model`` with every call measured: duration, token usage, failures by error class.

    Wrap the backend inside the concurrency bound (``BoundedModel(MeteredModel(backend), ...)``) so the
    duration is the server's, not the wait for a free slot. A stream the caller abandons is not a failure.
    """

    def __init__(self, model: ChatModel) -> None:
        self.inner = model
        self.name = model.name

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        started = time.perf_counter()
        try:
            async for chunk in self.inner.stream(request):
                if chunk.done:
                    # Recorded before the final chunk is handed on: a caller may stop reading there.
                    model_call(
                        time.perf_counter() - started, chunk.response.usage if chunk.response else None
                    )
                yield chunk
        except LLMError as exc:
            model_call(time.perf_counter() - started, ok=False)
            model_error(exc)
            raise

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    async def info(self) -> ModelInfo:
        return await self.inner.info()

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- values read at scrape time ------------------------------------------------------------------------


def observe_inbox(*, depth: int | None = None, dead_letters: int | None = None) -> None:
    """Set the inbox gauges (the /metrics route samples them before rendering)."""
    if depth is not None:
        INBOX_DEPTH.set(depth)
    if dead_letters is not None:
        INBOX_DEAD_LETTERS.set(dead_letters)


def observe_job_statuses(statuses: Iterable[Mapping[str, object]]) -> None:
    """Set the per-job gauges from job statuses kept in the shared store (see ``core.scheduler``)."""
    for status in statuses:
        job = str(status["name"])
        finished = status.get("finished_at")
        if isinstance(finished, int | float):
            JOB_LAST_RUN.labels(job=job).set(finished)
            JOB_LAST_OK.labels(job=job).set(1 if status.get("ok") else 0)
        succeeded = status.get("last_success_at")
        if isinstance(succeeded, int | float):
            JOB_LAST_SUCCESS.labels(job=job).set(succeeded)


_BREAKERS: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()


def track_breaker(breaker: CircuitBreaker) -> None:
    """Export ``breaker``'s state on /metrics for as long as it exists."""
    _BREAKERS.add(breaker)


class _BreakerCollector(Collector):
    """Reads the circuit breakers at scrape time: the state is computed (open turns half-open on its own)."""

    def collect(self) -> Iterable[Metric]:
        state = GaugeMetricFamily(
            "kefu_circuit_breaker_state",
            "1 for the current state of the breaker.",
            labels=["breaker", "state"],
        )
        opened = CounterMetricFamily(
            "kefu_circuit_breaker_opened", "How often the breaker opened.", labels=["breaker"]
        )
        for breaker in list(_BREAKERS):
            snapshot = breaker.snapshot()
            name = str(snapshot["name"])
            for candidate in BreakerState:
                state.add_metric(
                    [name, candidate.value], 1.0 if snapshot["state"] == candidate.value else 0.0
                )
            opened.add_metric([name], float(breaker.opened_count))
        yield state
        yield opened

    def describe(self) -> Iterable[Metric]:
        # Describing without collecting: registration must not read breakers that do not exist yet.
        return []


REGISTRY.register(_BreakerCollector())


def serve_metrics(*, port: int, host: str = "127.0.0.1") -> Callable[[], None]:
    """Serve :data:`REGISTRY` on ``http://host:port/metrics`` from a thread, for a process without the
    gateway (``kefu worker``); returns the function that stops the server."""
    server, thread = start_http_server(port, addr=host, registry=REGISTRY)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)

    return stop
