"""The model circuit breaker: opens after repeated failures, probes once after the cool-down."""

from __future__ import annotations

import pytest

from core.breaker import BreakerState, CircuitBreaker, counts_as_outage
from core.errors import ModelNotFound, ModelOutputError, ModelOverloaded, ModelTimeout, ModelUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, **kwargs: float) -> CircuitBreaker:
    options: dict[str, float] = {"failure_threshold": 3, "window": 60.0, "cooldown": 30.0} | kwargs
    return CircuitBreaker(clock=clock, **options)  # type: ignore[arg-type]


def test_opens_after_threshold_failures_and_refuses_at_once(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.state is BreakerState.CLOSED
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    clock.now += 29.9
    assert not b.allow()
    assert b.snapshot()["state"] == "open" and b.snapshot()["opened_count"] == 1


def test_failures_outside_the_window_do_not_add_up(clock: Clock) -> None:
    b = breaker(clock)
    b.record_failure()
    b.record_failure()
    clock.now += 61
    b.record_failure()
    assert b.state is BreakerState.CLOSED


def test_a_success_resets_the_count_of_consecutive_failures(clock: Clock) -> None:
    b = breaker(clock)
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.CLOSED


def test_half_open_lets_exactly_one_probe_through(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 30
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()  # the probe
    assert not b.allow()  # everyone else goes to the fallback meanwhile
    assert not b.allow()
    b.record_success()
    assert b.state is BreakerState.CLOSED
    assert b.allow() and b.allow()


def test_failed_probe_reopens_for_a_full_cooldown(clock: Clock) -> None:
    changes: list[tuple[BreakerState, BreakerState]] = []
    b = CircuitBreaker(
        failure_threshold=1, cooldown=30.0, clock=clock, on_change=lambda old, new: changes.append((old, new))
    )
    b.record_failure()
    clock.now += 30
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    clock.now += 29
    assert not b.allow()
    clock.now += 1
    assert b.allow()
    assert changes == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
    ]


def test_a_probe_that_never_reports_frees_its_slot(clock: Clock) -> None:
    b = breaker(clock, failure_threshold=1, probe_timeout=60.0)
    b.record_failure()
    clock.now += 30
    assert b.allow()
    clock.now += 59
    assert not b.allow()
    clock.now += 1
    assert b.allow()


def test_late_failure_of_a_request_started_before_opening_does_not_extend_the_cooldown(clock: Clock) -> None:
    b = breaker(clock, failure_threshold=1)
    b.record_failure()
    clock.now += 20
    b.record_failure()  # an in-flight request that began while closed
    clock.now += 10
    assert b.allow()


def test_which_errors_count_as_an_outage() -> None:
    assert counts_as_outage(ModelUnavailable("down"))
    assert counts_as_outage(ModelOverloaded("queue full"))
    assert counts_as_outage(ModelTimeout("slow"))
    assert counts_as_outage(ModelNotFound("no model"))
    assert counts_as_outage(TimeoutError())
    assert not counts_as_outage(ModelOutputError("garbage"))
    assert not counts_as_outage(ValueError("bug"))
