"""Latency summaries: percentiles over many samples, in milliseconds."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics.

    The same definition as ``numpy.percentile``'s default: rank ``(n - 1) * q / 100``.
    """
    if not len(samples):
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q} is outside [0, 100]")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencySummary:
    """Median, tail and mean of a list of latencies (ms)."""

    n: int
    p50: float
    p90: float
    p99: float
    mean: float
    max: float

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def summarize(samples_ms: Sequence[float]) -> LatencySummary:
    """Summarize latencies in ms; raises ``ValueError`` on an empty list."""
    values = sorted(float(v) for v in samples_ms)
    if not values:
        raise ValueError("no latency samples to summarize")
    p50, p90, p99 = (percentile(values, q) for q in (50, 90, 99))
    return LatencySummary(len(values), p50, p90, p99, sum(values) / len(values), values[-1])



def time_calls(fn: Callable[[], object], calls: int, warmup: int) -> dict[str, Any]:
    """:func:`summarize` (as JSON) of ``calls`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000.0)
    return summarize(samples).to_json()
