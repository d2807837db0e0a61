"""A circuit breaker: stop calling a dependency that keeps failing, probe it now and then.

States: ``closed`` (calls go through) -> ``open`` after ``failure_threshold`` consecutive failures
(calls are refused) -> ``half-open`` once ``open_seconds`` have passed (exactly one probe call is
let through; everyone else is still refused) -> ``closed`` when the probe succeeds, ``open`` again
when it fails.

State lives in the object, so it is per process: each model-server worker learns on its own
that the store is down, which costs at most ``failure_threshold`` slow calls per worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final, Literal

logger = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half-open"]

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half-open"


class CircuitBreaker:
    """Counts consecutive failures of one dependency and refuses calls while it is presumed down.

    Callers ask :meth:`allow` before a call and report its outcome with :meth:`record_success`
    or :meth:`record_failure`. Thread-safe. Outcomes reported while the breaker is open are
    ignored: they belong to calls that started before it opened, and only the probe decides.
    A probe that never reports (its caller died) is given up after another ``open_seconds``,
    and the next caller becomes the probe, so the breaker cannot stay half-open forever.
    """

    def __init__(
        self,
        name: str,
        failure_threshold: int,
        open_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold}")
        if open_seconds < 0:
            raise ValueError(f"open_seconds must not be negative, got {open_seconds}")
        self.name = name
        self._threshold = failure_threshold
        self._open_s = open_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = CLOSED
        self._failures = 0
        self._since = 0.0  # when the breaker opened, or when the current probe was let through

    @property
    def state(self) -> BreakerState:
        """The current state (a probe due but not yet asked for still reads ``open``)."""
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """True when the caller may call the dependency now (and must then report the outcome)."""
        with self._lock:
            if self._state == CLOSED:
                return True
            now = self._clock()
            if now - self._since < self._open_s:
                return False
            # Open long enough (or the probe went silent): this caller is the one probe.
            changed = self._state == OPEN
            self._state, self._since = HALF_OPEN, now
        if changed:
            logger.info("circuit breaker %s: open -> half-open, one probe call let through", self.name)
        return True

    def record_success(self) -> None:
        """The call succeeded: reset the failure count; a successful probe closes the breaker."""
        with self._lock:
            self._failures = 0
            if self._state != HALF_OPEN:
                return
            self._state = CLOSED
        logger.info("circuit breaker %s: half-open -> closed, the probe succeeded", self.name)

    def record_failure(self) -> None:
        """The call failed or timed out: open after the threshold, or again after a failed probe."""
        with self._lock:
            if self._state == OPEN:
                return
            self._failures += 1
            previous = self._state
            if previous == CLOSED and self._failures < self._threshold:
                return
            self._state, self._since = OPEN, self._clock()
            failures = self._failures
        if previous == HALF_OPEN:
            logger.warning("circuit breaker %s: half-open -> open, the probe failed; calls refused for %g s",
                           self.name, self._open_s)
        else:
            logger.warning("circuit breaker %s: closed -> open after %d consecutive failures; calls refused "
                           "for %g s", self.name, failures, self._open_s)
