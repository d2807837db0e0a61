"""The circuit breaker's state machine, with a fake clock."""

from __future__ import annotations

import logging
import threading

import pytest

from twostage_rec.circuit_breaker import CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def opened(clock: FakeClock, threshold: int = 3, open_seconds: float = 5.0) -> CircuitBreaker:
    breaker = CircuitBreaker("fs:test", threshold, open_seconds, clock=clock)
    for _ in range(threshold):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "open"
    return breaker


def test_opens_only_after_consecutive_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker("fs:test", 3, 5.0, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    breaker.record_success()  # resets the count
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()


def test_one_probe_after_the_open_period_then_closes_on_success(clock: FakeClock) -> None:
    breaker = opened(clock)
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()  # the probe
    assert breaker.state == "half-open"
    assert not breaker.allow() and not breaker.allow()  # everyone else waits for the probe
    breaker.record_success()
    assert breaker.state == "closed"
    assert all(breaker.allow() for _ in range(3))


def test_failed_probe_opens_again_for_a_full_period(clock: FakeClock) -> None:
    breaker = opened(clock)
    clock.now += 5.0
    assert breaker.allow()
    clock.now += 1.0
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()


def test_outcomes_of_calls_started_before_opening_are_ignored(clock: FakeClock) -> None:
    breaker = opened(clock)
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 5.0
    assert breaker.allow()


def test_a_silent_probe_is_replaced_after_another_period(clock: FakeClock) -> None:
    breaker = opened(clock)
    clock.now += 5.0
    assert breaker.allow()  # this probe never reports
    clock.now += 4.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"


def test_exactly_one_probe_among_concurrent_callers(clock: FakeClock) -> None:
    breaker = opened(clock)
    clock.now += 5.0
    start = threading.Barrier(16)
    allowed: list[bool] = []
    lock = threading.Lock()

    def call() -> None:
        start.wait()
        result = breaker.allow()
        with lock:
            allowed.append(result)

    threads = [threading.Thread(target=call) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(allowed) == [False] * 15 + [True]


def test_logs_one_line_per_state_change(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="twostage_rec.circuit_breaker")
    breaker = opened(clock)
    breaker.allow()
    breaker.record_failure()  # ignored while open: no line
    clock.now += 5.0
    breaker.allow()
    breaker.allow()  # refused: no line
    breaker.record_failure()
    clock.now += 5.0
    breaker.allow()
    breaker.record_success()
    breaker.record_success()  # already closed: no line
    lines = [r.getMessage() for r in caplog.records if r.name == "twostage_rec.circuit_breaker"]
    assert [line.split(": ", 1)[1].split(",")[0].split(" after")[0] for line in lines] == [
        "closed -> open", "open -> half-open", "half-open -> open", "open -> half-open", "half-open -> closed"]
    assert all(line.startswith("circuit breaker fs:test: ") for line in lines)


@pytest.mark.parametrize(("threshold", "open_seconds"), [(0, 1.0), (1, -1.0)])
def test_rejects_bad_parameters(threshold: int, open_seconds: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", threshold, open_seconds)
