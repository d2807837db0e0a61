"""A closed-loop HTTP load generator for ``/invocations`` that records every call's outcome.

    with Load("127.0.0.1", port, [Call(body)], concurrency=8) as load:
        time.sleep(20)
    print(summarize(load.outcomes()))

Each client thread keeps one keep-alive connection (as SageMaker's front end does), sends the
calls round-robin and reconnects after a failure. Nothing is retried: a call that gets no HTTP
answer is recorded as such, because counting those is the point.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

JSON = "application/json"


@dataclass(frozen=True)
class Call:
    """One request body and the status a healthy server answers it with."""

    body: bytes
    expect: int = 200


@dataclass(frozen=True)
class Outcome:
    """What one call got. ``status`` is None when no HTTP answer came (``error`` says why)."""

    started: float  # time.monotonic()
    finished: float
    expect: int
    status: int | None
    error: str | None = None  # the exception's class name, or the JSON body's "error" code
    degraded: bool | None = None  # the answer's "degraded" flag (single requests only)

    @property
    def ok(self) -> bool:
        return self.status == self.expect

    @property
    def latency_ms(self) -> float:
        return (self.finished - self.started) * 1000.0

    @property
    def kind(self) -> str:
        """A short label for counting: ``200``, ``500 internal_error``, ``ConnectionResetError``."""
        if self.status is None:
            return str(self.error)
        return f"{self.status} {self.error}" if self.error else str(self.status)


class Load:
    """``concurrency`` threads posting ``calls`` to ``http://host:port/invocations`` until stopped."""

    def __init__(self, host: str, port: int, calls: Sequence[Call], concurrency: int, timeout_s: float = 30.0) -> None:
        if not calls:
            raise ValueError("Load needs at least one call")
        self._host, self._port, self._calls = host, port, list(calls)
        self._timeout = timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []
        self._threads = [
            threading.Thread(target=self._client, args=(n,), name=f"load-{n}", daemon=True) for n in range(concurrency)
        ]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Outcome]:
        """Stop sending, wait for the calls in flight to finish, return every outcome."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self._timeout + 5)
        return self.outcomes()

    def outcomes(self) -> list[Outcome]:
        """The outcomes so far, in completion order."""
        with self._lock:
            return list(self._outcomes)

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _client(self, number: int) -> None:
        conn: http.client.HTTPConnection | None = None
        position = number  # threads start at different calls so a mix is exercised from the start
        while not self._stop.is_set():
            call = self._calls[position % len(self._calls)]
            position += 1
            if conn is None:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            started = time.monotonic()
            try:
                conn.request("POST", "/invocations", body=call.body, headers={"Content-Type": JSON})
                response = conn.getresponse()
                outcome = _outcome(started, call.expect, response.status, response.read())
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                outcome = Outcome(started, time.monotonic(), call.expect, None, type(exc).__name__)
                conn.close()
                conn = None
                self._stop.wait(0.01)  # a refused connection fails at once: do not spin
            with self._lock:
                self._outcomes.append(outcome)
        if conn is not None:
            conn.close()


def _outcome(started: float, expect: int, status: int, body: bytes) -> Outcome:
    finished = time.monotonic()
    try:
        payload: Any = json.loads(body)
    except ValueError:
        payload = None
    error = payload.get("error") or payload.get("type") if isinstance(payload, dict) and status != 200 else None
    degraded = payload.get("degraded") if isinstance(payload, dict) and status == 200 else None
    if status != 200 and error is None:
        error = "not JSON" if body else "empty body"
    return Outcome(started, finished, expect, status, error, degraded)


@dataclass(frozen=True)
class Summary:
    """Counts and latency percentiles of a list of outcomes."""

    calls: int
    failed: int
    kinds: dict[str, int] = field(default_factory=dict)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    degraded: int = 0

    def line(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.kinds.items()))
        return (
            f"{self.calls} calls, {self.failed} failed ({kinds}); latency p50 {self.p50_ms:.1f} ms, "
            f"p99 {self.p99_ms:.1f} ms, max {self.max_ms:.1f} ms; {self.degraded} degraded"
        )


def summarize(outcomes: Sequence[Outcome]) -> Summary:
    latencies = sorted(o.latency_ms for o in outcomes)
    return Summary(
        calls=len(outcomes),
        failed=sum(not o.ok for o in outcomes),
        kinds=dict(Counter(o.kind for o in outcomes)),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        max_ms=latencies[-1] if latencies else 0.0,
        degraded=sum(o.degraded is True for o in outcomes),
    )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = min(max(math.ceil(q / 100.0 * len(sorted_values)), 1), len(sorted_values))
    return float(sorted_values[rank - 1])
