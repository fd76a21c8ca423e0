"""A circuit breaker for the model backend: stop waiting on a model that is down.

    closed ──(``failure_threshold`` failures within ``window`` s)──▶ open
    open ──(``cooldown`` s later, the next request is the probe)──▶ half-open
    half-open ──(probe succeeds)──▶ closed        half-open ──(probe fails)──▶ open (new cool-down)

While open, :meth:`CircuitBreaker.allow` says no at once and the caller answers from the FAQ fallback,
so during an outage no customer waits for a model timeout, except the one probe per cool-down.
In half-open exactly one probe runs at a time; a probe that never reports (its task was cancelled)
frees its slot after ``probe_timeout`` seconds. A success in closed state clears earlier failures:
only consecutive failures open the breaker.

State is per process (each process finds out on its own that the model is back); ``snapshot`` gives
what /readyz and metrics show. The clock is injectable so tests need no sleeps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum

from core.errors import LLMError, ModelOutputError

__all__ = ["BreakerState", "CircuitBreaker", "counts_as_outage"]

log = logging.getLogger(__name__)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def counts_as_outage(exc: BaseException) -> bool:
    """Whether a model error should count against the breaker.

    Unreachable, overloaded, timed out or missing model: yes. A model that answered with something
    unusable (:class:`ModelOutputError`) is up, so no.
    """
    return isinstance(exc, LLMError | TimeoutError) and not isinstance(exc, ModelOutputError)


class CircuitBreaker:
    """closed → open → half-open → closed, with an injectable clock."""

    def __init__(
        self,
        *,
        name: str = "model",
        failure_threshold: int = 3,
        window: float = 60.0,
        cooldown: float = 30.0,
        probe_timeout: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.name = name
        self.failure_threshold = failure_threshold
        self.window = window
        self.cooldown = cooldown
        self.probe_timeout = probe_timeout
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures: deque[float] = deque()
        self._opened_at = 0.0
        self._probe_started: float | None = None
        self.opened_count = 0
        """How many times the breaker opened (a metric)."""

    @property
    def state(self) -> BreakerState:
        """The state now; an open breaker whose cool-down is over reads as half-open."""
        with self._lock:
            if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown:
                return BreakerState.HALF_OPEN
            return self._state

    def allow(self) -> bool:
        """May this request call the model? In half-open only the one probe may."""
        with self._lock:
            now = self._clock()
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN:
                if now - self._opened_at < self.cooldown:
                    return False
                self._move(BreakerState.HALF_OPEN)
            # half-open: one probe at a time; a probe that never reported is given up on.
            if self._probe_started is not None and now - self._probe_started < self.probe_timeout:
                return False
            self._probe_started = now
            return True

    def record_success(self) -> None:
        """The model answered: close the breaker and forget earlier failures."""
        with self._lock:
            self._failures.clear()
            self._probe_started = None
            if self._state is not BreakerState.CLOSED:
                self._move(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """The model failed or timed out."""
        with self._lock:
            now = self._clock()
            if self._state is BreakerState.HALF_OPEN:
                self._open(now)  # the probe failed: another full cool-down
                return
            if self._state is BreakerState.OPEN:
                return  # a request that started before the breaker opened
            self._failures.append(now)
            while self._failures and now - self._failures[0] > self.window:
                self._failures.popleft()
            if len(self._failures) >= self.failure_threshold:
                self._open(now)

    def snapshot(self) -> dict[str, object]:
        """State for /readyz and metrics."""
        state = self.state
        with self._lock:
            retry_in = (
                max(0.0, self.cooldown - (self._clock() - self._opened_at))
                if state is BreakerState.OPEN
                else 0.0
            )
            return {
                "name": self.name,
                "state": state.value,
                "recent_failures": len(self._failures),
                "opened_count": self.opened_count,
                "retry_in_seconds": round(retry_in, 3),
            }

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._failures.clear()
        self._probe_started = None
        self.opened_count += 1
        self._move(BreakerState.OPEN)

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if old is new:
            return
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(level, "circuit breaker %s: %s -> %s", self.name, old.value, new.value)
        if self._on_change is not None:
            try:
                self._on_change(old, new)
            except Exception:
                log.error("circuit breaker listener failed", exc_info=True)
