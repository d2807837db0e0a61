"""Smoke tests of the benchmark suite: percentiles, report formatting and the synthetic model
writer (no timing asserts, no servers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import inprocess, report
from bench.models import HISTORY_LENGTH, NEIGHBOURS_PER_ITEM, packaged_indexes, synthetic_name, write_synthetic_model
from bench.stats import percentile, summarize
from training.ranker_features import ranker_feature_names
from twostage_rec import schema
from twostage_rec.artifact import load_artifact
from twostage_rec.settings import Settings


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


ANN_TARGET = "1M items: approximate top-100 p50 <= 2 ms at recall@100 >= 0.95 (IVF retriever alone)"


def _latency(p50: float, p99: float) -> dict[str, float]:
    return {"n": 2000, "p50": p50, "p90": p99, "p99": p99, "mean": p50, "max": p99}


def _inprocess(items: int, retrieval: float, handler: float) -> dict[str, Any]:
    stages = {s: _latency(retrieval, retrieval * 2) for s in ("history", "retrieval", "features", "ranking", "total")}
    index = {"n_lists": 1000, "n_probe": 80, "recall_at_100": 0.955}
    return {"n_items": items, "n_users": 6040, "requests": 2000, "stages_ms": stages,
            "handler_ms": _latency(handler, 9), "sources": ["mf", "item_neighbours", "sequence"],
            "retrievers": {"mf": {"retriever": "ivf", "index": index, "ann_min_recall": 0.95},
                           "sequence": {"retriever": "exact", "index": {**index, "recall_at_100": 0.62},
                                        "ann_min_recall": 0.95}}}


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
        "batch": {"model": "ml-1m",
                  "inprocess": {"1": {"requests": 10, "per_user_p50_ms": 2.0, "per_user_p99_ms": 4.0},
                                "10": {"requests": 1, "per_user_p50_ms": 0.5, "per_user_p99_ms": 0.6},
                                "100": {"requests": 1, "per_user_p50_ms": 0.8, "per_user_p99_ms": 1.2}},
                  "host": {"1": {"requests": 10, "per_user_p50_ms": 3.0}}},
        "memory": {"synthetic-1M": {"runs": [run], "growth_per_worker_mb": 12.5}},
        "notes": ["a note"],
    }


def test_targets_verdicts() -> None:
    by_name = {t["target"]: t for t in report.targets(_results())}
    one = by_name["ML-1M one user in-process: handler p50 <= 3 ms"]
    assert one["met"] is True and one["measured"] == "ml-1m: 2.00 / 9.00 ms (p50 / p99)"
    batch = by_name["ML-1M batch of 100 users in-process: <= 1 ms per user (request p50 / 100)"]
    assert batch["met"] is True and batch["measured"] == "ml-1m: 0.80 ms per user (p99 1.20 ms)"
    million = by_name["1M items one user in-process: handler p50 <= 10 ms"]
    assert million["met"] is False  # 25 ms
    assert "mf IVF (80 of 1000 cells, recall@100 0.955 at packaging)" in million["measured"]
    assert "sequence exact (its index reached recall@100 0.620 at packaging, below ANN_MIN_RECALL 0.95)" in (
        million["measured"])
    verdicts = {t["target"].split(":")[0]: t for t in report.targets(_results())}
    assert verdicts["ML-1M one user"]["met"] is True  # 2.5 <= 2.0 + 1
    assert "ml-1m: 2.50 ms vs 2.00 ms in-process (+0.50 ms)" in verdicts["ML-1M one user"]["measured"]
    assert verdicts[">= 400 req/s at concurrency 8"]["met"] is False  # the container's 350 fails it
    assert verdicts["cold start <= 10 s (serve start to first good /invocations)"]["met"] is False
    assert verdicts["1M x 64"]["met"] is True
    assert by_name[ANN_TARGET]["met"] is None


def test_quick_run_checks_the_ml_1m_targets_on_its_own_model() -> None:
    results = _results()
    results["inprocess"] = {"synthetic-2k": _inprocess(2000, 0.5, 3.5)}
    results["batch"]["model"] = "synthetic-2k"
    by_name = {t["target"]: t for t in report.targets(results)}
    one = by_name["ML-1M one user in-process: handler p50 <= 3 ms"]
    assert one["met"] is False and one["measured"].startswith("synthetic-2k: 3.50")
    assert by_name["ML-1M batch of 100 users in-process: <= 1 ms per user (request p50 / 100)"]["measured"].startswith(
        "synthetic-2k:")
    assert by_name["1M items one user in-process: handler p50 <= 10 ms"]["met"] is None


def test_ann_targets_and_section() -> None:
    results = _results()
    results["ann"] = {
        "n_items": 1_000_000, "dim": 64, "ann": {"recall_at_100": 0.955}, "index_mib": 256.0,
        "item_factors_mib": 252.0, "exact_ms": {"p50": 12.9, "p99": 19.3}, "ann_ms": {"p50": 1.38, "p99": 3.5},
        "ann_filter_third_ms": {"p50": 2.5, "p99": 8.7}, "ann_filter_1pct_ms": {"p50": 0.6, "p99": 2.9},
        "recall_filter_third": 0.961, "peak_rss_mib": 1100.0,
    }
    by_name = {t["target"]: t for t in report.targets(results)}
    assert by_name[ANN_TARGET]["met"] is True
    results["targets"] = report.targets(results)
    assert "| IVF | 1.38 | 3.50 |" in report.markdown(results)


def test_sequence_encoder_section() -> None:
    results = _results()
    onnx_ms, torch_ms = _latency(0.4, 0.8), _latency(0.6, 1.0)
    results["sequence_encoder"] = {
        "n_items": 3706, "dim": 64, "n_blocks": 2, "n_heads": 1, "max_length": 50, "batch": 100,
        "repeats": 2000, "batch_repeats": 200,
        "max_abs_diff_vs_torch": {"onnxruntime": 1.3e-6, "torch": 0.0},
        "one_user_ms": {"onnxruntime": onnx_ms, "torch": torch_ms},
        "batch_ms": {"onnxruntime": _latency(40.0, 45.0), "torch": _latency(50.0, 60.0)},
        "onnxruntime_version": "1.32.0", "torch_version": "2.13.0",
    }
    results["targets"] = report.targets(results)
    text = report.markdown(results)
    assert "## Sequence encoder: ONNX Runtime vs PyTorch" in text
    assert "| onnxruntime | 0.40 / 0.80 | 40.00 / 45.00 | 0.40 | 1.3e-06 |" in text
    assert "| torch | 0.60 / 1.00 | 50.00 / 60.00 | 0.50 | 0.0e+00 |" in text
    assert "0.67x for one user, 0.80x for a batch of 100" in text


def test_targets_not_measured() -> None:
    assert all(t["met"] is None for t in report.targets({"notes": []}))


def test_markdown_renders_every_section() -> None:
    results = _results()
    results["targets"] = report.targets(results)
    text = report.markdown(results)
    for heading in ("# Benchmarks", "## Targets", "## In-process latency", "## End-to-end",
                    "## Batch requests: per-user cost (ml-1m)", "## Memory", "## Notes"):
        assert heading in text
    assert "Test CPU, 2 cores" in text and "`abc123`" in text and "24.0 GiB" in text
    header = "| model | items | users | requests | history | retrieval | features | ranking | recommend | handler |"
    assert header in text
    assert "| synthetic-1M | 1,000,000 | 6,040 | 2000 | 20.00 / 40.00 |" in text
    assert "- synthetic-1M (mf, item_neighbours, sequence): mf IVF (80 of 1000 cells" in text
    assert "| host | ml-1m | 2 | 8 | 2000 | 0 | 450 | 9.00 / 9.00 | 1.00 / 3.00 | 7.00 | 4.50x |" in text
    assert "| 10 | 1 | 0.50 / 0.60 | 0.25x | – | – |" in text
    assert "**not met**" in text
    table_rows = [line for line in text.splitlines() if line.startswith("|")]
    assert all(line.endswith("|") for line in table_rows)


def test_synthetic_names() -> None:
    assert [synthetic_name(n) for n in (2000, 100_000, 1_000_000)] == ["synthetic-2k", "synthetic-100k", "synthetic-1M"]


def test_synthetic_model_is_servable_in_the_new_format(tmp_path: Path) -> None:
    n_items, n_users = 600, 120
    manifest = write_synthetic_model(tmp_path / "model", n_items, n_users, ann_min_items=0)
    artifact = load_artifact(tmp_path / "model", verify_checksums=True)
    assert manifest.ranker_features == list(ranker_feature_names(list(schema.SOURCES)))
    assert set(schema.SOURCES) <= set(manifest.sources)
    layout = manifest.sequence_model
    assert layout is not None and (layout["dim"], layout["n_blocks"], layout["n_heads"], layout["max_length"]) == (
        64, 2, 1, 50)
    assert artifact.sequence_item_vectors is not None and artifact.sequence_item_vectors.shape == (n_items, 64)
    assert np.all(np.diff(artifact.seen_indptr) >= HISTORY_LENGTH)  # a full history for every user
    for u in range(n_users):  # in time order, each item once
        a, b = artifact.seen_indptr[u], artifact.seen_indptr[u + 1]
        assert np.all(np.diff(artifact.seen_timestamps[a:b]) >= 0)
        assert len(np.unique(artifact.seen_indices[a:b])) == b - a
    assert int(artifact.item_timeline_indptr[-1]) == int(artifact.seen_indptr[-1])
    assert int(artifact.seen_timestamps.max()) < manifest.data_end
    assert np.all(np.diff(artifact.neighbour_indptr) == NEIGHBOURS_PER_ITEM)
    lists = artifact.neighbour_items.reshape(n_items, -1)
    assert not (lists == np.arange(n_items)[:, None]).any()  # never an item's own neighbour
    assert np.all(np.diff(artifact.neighbour_scores.reshape(n_items, -1), axis=1) <= 0)
    assert artifact.ann_index is not None and artifact.sequence_ann_index is not None
    assert set(packaged_indexes(manifest.extra)) == {schema.SOURCE_MF, schema.SOURCE_SEQUENCE}

    result = inprocess.stage_latency(tmp_path / "model", n_requests=inprocess.WARMUP + 5)
    assert list(result["stages_ms"]) == ["history", "retrieval", "features", "ranking", "total"]
    assert result["sources"] == list(schema.SOURCES)
    # Serving's default ANN_MIN_ITEMS is far above 600 items: both sources score every item.
    assert {s: x["retriever"] for s, x in result["retrievers"].items()} == {"mf": "exact", "sequence": "exact"}
    assert result["retrievers"]["mf"]["index"]["n_lists"] == artifact.ann_index.n_lists


def test_small_synthetic_model_has_no_index(tmp_path: Path) -> None:
    manifest = write_synthetic_model(tmp_path / "model", 300, 40)
    assert packaged_indexes(manifest.extra) == {}
    result = inprocess.retrievers(load_artifact(tmp_path / "model"), Settings())
    assert result == {"mf": {"retriever": "exact", "index": None, "ann_min_recall": Settings().ann_min_recall},
                      "sequence": {"retriever": "exact", "index": None, "ann_min_recall": Settings().ann_min_recall}}


def test_allocator_bench_compares_both_settings_in_child_processes(tmp_path: Path) -> None:
    from bench import allocator

    write_synthetic_model(tmp_path / "model", 300, 40)
    result = allocator.compare(tmp_path / "model", users=200, rounds=1)
    assert set(result) >= {"glibc_defaults", "kept_256mb", "p50_ratio_defaults_over_kept"}
    for name in allocator.SETTINGS:
        assert set(result[name]) == {"1", "100", "anon_growth_mb"}
        assert all(result[name][size]["per_user_p50_ms"] > 0 and result[name][size]["faults_per_request"] >= 0
                   for size in ("1", "100"))
    assert set(result["p50_ratio_defaults_over_kept"]) == {"1", "100"}


def test_metrics_cost_measures_the_hook_the_handler_both_ways_and_says_why_not_the_library(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import metrics_cost

    monkeypatch.setenv("AWS_EMF_ENVIRONMENT", "Local")  # the library's setting, should it be installed
    out = metrics_cost.measure(tiny_model_dir, 60, 300)
    assert out["hook_us"]["calls"] == 300 and out["hook_us"]["p50"] > 0
    assert set(out["handler_us"]) >= {"without_metrics", "with_metrics", "paired_difference_median"}
    assert out["target"]["met"] == (out["hook_us"]["p99"] <= metrics_cost.TARGET_US)
    library = out["library_us"]
    assert library["measured"] or "pip install aws-embedded-metrics" in library["reason"]
    json.dumps(out)  # printable as it is
