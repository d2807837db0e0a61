"""Smoke tests of the benchmark suite's percentile code and report formatting (no timing, no servers)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from bench import report
from bench.stats import percentile, summarize


def test_percentile_matches_numpy_linear_interpolation() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 2001):
        samples = rng.lognormal(0, 1, n).tolist()
        for q in (0, 1, 50, 90, 99, 100):
            assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)))


def test_percentile_by_hand() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5  # unsorted input
    assert percentile([10.0], 99) == 10.0
    assert percentile(list(range(101)), 99) == 99.0


@pytest.mark.parametrize("bad", [([], 50), ([1.0], -1), ([1.0], 101)])
def test_percentile_rejects_bad_input(bad: tuple[list[float], float]) -> None:
    with pytest.raises(ValueError):
        percentile(*bad)


def test_summarize() -> None:
    s = summarize([float(v) for v in range(1, 101)])
    assert (s.n, s.p50, s.mean, s.max) == (100, 50.5, 50.5, 100.0)
    assert s.p99 == pytest.approx(99.01)
    assert json.loads(json.dumps(s.to_json()))["p90"] == pytest.approx(90.1)
    with pytest.raises(ValueError):
        summarize([])


def _latency(p50: float, p99: float) -> dict[str, float]:
    return {"n": 2000, "p50": p50, "p90": p99, "p99": p99, "mean": p50, "max": p99}


def _inprocess(items: int, retrieval: float, handler: float) -> dict[str, Any]:
    stages = {s: _latency(retrieval, retrieval * 2) for s in ("retrieval", "features", "ranking", "total")}
    return {"n_items": items, "n_users": 6040, "requests": 2000, "stages_ms": stages,
            "handler_ms": _latency(handler, 9)}


def _load(concurrency: int, rps: float, p50: float) -> dict[str, Any]:
    return {"concurrency": concurrency, "requests": 2000, "errors": 0, "rps": rps, "latency_ms": _latency(p50, 9),
            "handler_ms": _latency(1.0, 3.0),
            "overhead_ms": p50 - 2.0, "ratio_to_inprocess": p50 / 2.0}


def _results() -> dict[str, Any]:
    run = {"workers": 1, "cold_start_s": 4.0, "total_mb": 500.0, "per_worker_mb": 30.0,
           "processes": [{"role": "serve", "pss_mb": 40.0}, {"role": "java", "pss_mb": 120.0},
                         {"role": "preload", "pss_mb": 310.0}, {"role": "worker", "pss_mb": 30.0}]}
    return {
        "command": "python -m bench", "started_at": "2026-01-01T00:00:00+00:00", "duration_s": 600.0,
        "json": "bench-results/x.json", "load_before": [1.0, 2.0, 3.0], "load_after": [1.5, 2.0, 3.0],
        "machine": {"cpu": "Test CPU", "cores": 2, "ram_gib": 24.0, "commit": "abc123", "dirty": False,
                    "python": "3.11", "numpy": "2", "xgboost": "3", "omp_num_threads": "1"},
        "inprocess": {"ml-1m": _inprocess(3706, 0.1, 2.0), "synthetic-1M": _inprocess(10**6, 20.0, 25.0)},
        "host": {"model": "ml-1m", "workers": 2, "cold_start_s": 5.0,
                 "loads": [_load(1, 300.0, 2.5), _load(8, 450.0, 9.0)]},
        "container": {"model": "ml-1m", "workers": 2, "cold_start_s": 12.0, "loads": [_load(8, 350.0, 11.0)]},
        "batch": {"inprocess": {"1": {"requests": 10, "per_user_p50_ms": 2.0},
                                "10": {"requests": 1, "per_user_p50_ms": 0.5}},
                  "host": {"1": {"requests": 10, "per_user_p50_ms": 3.0}}},
        "memory": {"synthetic-1M": {"runs": [run], "growth_per_worker_mb": 12.5}},
        "notes": ["a note"],
    }


def test_targets_verdicts() -> None:
    verdicts = {t["target"].split(":")[0]: t for t in report.targets(_results())}
    assert verdicts["ML-1M one user"]["met"] is True  # 2.5 <= 2.0 + 1
    assert "ml-1m: 2.50 ms vs 2.00 ms in-process (+0.50 ms)" in verdicts["ML-1M one user"]["measured"]
    assert verdicts[">= 400 req/s at concurrency 8"]["met"] is False  # the container's 350 fails it
    assert verdicts["cold start <= 10 s (serve start to first good /invocations)"]["met"] is False
    assert verdicts["1M x 64"]["met"] is True
    by_name = {t["target"]: t for t in report.targets(_results())}
    assert by_name["1M items: exact retrieval p50 <= 15 ms (the serving path, 50k users)"]["met"] is False  # 20 ms
    assert by_name["1M items: approximate top-100 p50 <= 2 ms at recall@100 >= 0.95"]["met"] is None  # not run


def test_ann_targets_and_section() -> None:
    results = _results()
    results["ann"] = {
        "n_items": 1_000_000, "dim": 64, "ann": {"recall_at_100": 0.955}, "index_mib": 256.0,
        "item_factors_mib": 252.0, "exact_ms": {"p50": 12.9, "p99": 19.3}, "ann_ms": {"p50": 1.38, "p99": 3.5},
        "ann_filter_third_ms": {"p50": 2.5, "p99": 8.7}, "ann_filter_1pct_ms": {"p50": 0.6, "p99": 2.9},
        "recall_filter_third": 0.961, "peak_rss_mib": 1100.0,
    }
    by_name = {t["target"]: t for t in report.targets(results)}
    assert by_name["1M items: approximate top-100 p50 <= 2 ms at recall@100 >= 0.95"]["met"] is True
    assert by_name["1M items: exact retrieval p50 <= 15 ms (retriever alone, training.ann_index)"]["met"] is True
    results["targets"] = report.targets(results)
    assert "| IVF | 1.38 | 3.50 |" in report.markdown(results)


def test_targets_not_measured() -> None:
    assert all(t["met"] is None for t in report.targets({"notes": []}))


def test_markdown_renders_every_section() -> None:
    results = _results()
    results["targets"] = report.targets(results)
    text = report.markdown(results)
    for heading in ("# Benchmarks", "## Targets", "## In-process latency", "## End-to-end", "## Batch requests",
                    "## Memory", "## Notes"):
        assert heading in text
    assert "Test CPU, 2 cores" in text and "`abc123`" in text and "24.0 GiB" in text
    assert "| synthetic-1M | 1,000,000 | 6,040 | 2000 | 20.00 / 40.00 |" in text
    assert "| host | ml-1m | 2 | 8 | 2000 | 0 | 450 | 9.00 / 9.00 | 1.00 / 3.00 | 7.00 | 4.50x |" in text
    assert "| 10 | 1 | 0.50 | 0.25x | – | – |" in text
    assert "**not met**" in text
    table_rows = [line for line in text.splitlines() if line.startswith("|")]
    assert all(line.endswith("|") for line in table_rows)
