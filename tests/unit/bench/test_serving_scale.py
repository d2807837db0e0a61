"""The serving-scale benchmark's pure parts: the grid, the byte split, the fits, the verdicts, the
report section, and the Amazon-shaped writer at a tiny size with many users."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import report, serving_scale
from bench.models import HISTORY_LENGTH, sparse_histories, write_synthetic_model
from bench.serving_scale import Cell, count_label, fit_linear, grid, parse_count, split_bytes
from twostage_rec import artifact as a
from twostage_rec.artifact import load_artifact, load_ids
from twostage_rec.recommender import TwoStageRecommender
from twostage_rec.request import RecommendationRequest


@pytest.mark.parametrize(("text", "count"), [("10k", 10_000), ("1M", 1_000_000), ("10m", 10_000_000),
                                             ("2500", 2500), ("2.5M", 2_500_000), ("100_000", 100_000)])
def test_parse_count(text: str, count: int) -> None:
    assert parse_count(text) == count


@pytest.mark.parametrize("bad", ["", "k", "ten", "0", "-5", "1.5", "0.0005k"])
def test_parse_count_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_count(bad)


def test_count_label_round_trips() -> None:
    for n in (10_000, 100_000, 1_000_000, 10_000_000, 2_500_000, 1234, 600):
        assert parse_count(count_label(n)) == n
    assert [count_label(n) for n in (10_000, 1_000_000, 2_500_000, 1234)] == ["10k", "1M", "2.5M", "1234"]


def test_grid_runs_the_smallest_artifacts_first() -> None:
    cells = grid([1_000_000, 10_000, 10_000], [10_000_000, 100_000])
    assert cells == [Cell(10_000, 100_000), Cell(1_000_000, 100_000), Cell(10_000, 10_000_000),
                     Cell(1_000_000, 10_000_000)]
    assert cells[-1].name == "1M items x 10M users"


def test_split_bytes() -> None:
    sizes = {a.USER_FACTORS: 100, a.USER_ID_FILES[0]: 7, a.SEEN_TIMESTAMPS: 3, a.ITEM_FACTORS: 50,
             a.SEQUENCE_ANN_PREFIX + a.ANN_VECTORS: 20, a.ANN_CENTROIDS: 1, a.RANKER: 9, a.MANIFEST: 2}
    assert split_bytes(sizes) == {"users": 110, "items": 71, "other": 11}


def test_added_per_worker() -> None:
    runs = [{"workers": 2, "total_mb": 530.0}, {"workers": 1, "total_mb": 500.0}, {"workers": 4, "total_mb": 590.0}]
    assert serving_scale.added_per_worker(runs) == pytest.approx(30.0)
    assert serving_scale.added_per_worker(runs[:1]) is None


def test_fit_linear_recovers_exact_costs() -> None:
    points = [(i, u, 5.0 + 2.0 * i + 0.5 * u) for i in (10, 100, 1000) for u in (7, 70)]
    fit = fit_linear(points)
    assert fit is not None
    assert fit["base"] == pytest.approx(5.0) and fit["per_item"] == pytest.approx(2.0)
    assert fit["per_user"] == pytest.approx(0.5)
    assert fit_linear(points[:2]) is None
    assert fit_linear([(10, 7, 1.0), (100, 7, 2.0), (1000, 7, 3.0)]) is None  # one user count: no per-user cost


def _cell(n_items: int, n_users: int, p50: float, first: float, serve_s: float, totals: list[float]) -> dict[str, Any]:
    runs = [{"workers": w, "cold_start_s": serve_s, "cold_start_cpu_s": serve_s / 2, "total_mb": t,
             "per_worker_mb": 10.0, "roles_mb": {"serve": 1.0, "java": 100.0, "preload": 50.0, "worker": 10.0 * w},
             "anon_mb": t - 300.0 - 2 * w, "file_mb": 300.0 + 2 * w}
            for w, t in zip((1, 2, 4), totals)]
    return {
        "name": Cell(n_items, n_users).name, "n_items": n_items, "n_users": n_users, "interactions": 5 * n_users,
        "disk": {"total_bytes": 400 * n_users + 900 * n_items, "bytes_per_user": 400.0, "bytes_per_item": 900.0},
        "probe": {"first_answer_s": first, "first_answer_cpu_s": first / 2, "load_avg": [2.0, 1.5, 1.0],
                  "import_s": 0.5, "load_s": 0.2, "first_s": 0.1,
                  "memory_after_first_mb": {"rss": 200.0, "uss": 120.0, "pss": 150.0},
                  "handler_ms": {"p50": p50, "p99": 2 * p50}},
        "served": {"runs": runs, "added_per_worker_mb": serving_scale.added_per_worker(runs),
                   "added_anon_per_worker_mb": serving_scale.added_per_worker(runs) - 2.0},
    }


def _scale() -> dict[str, Any]:
    cells = [_cell(10_000, 100_000, 2.0, 1.5, 6.0, [500, 520, 560]),
             _cell(1_000_000, 10_000_000, 12.0, 4.0, 11.0, [900, 930, 990]),
             _cell(10_000, 10_000_000, 2.5, 3.0, 8.0, [700, 720, 760])]
    interleaved = [{"n_items": 10_000, "n_users": [100_000, 10_000_000], "load_avg": [2.0, 1.0, 1.0],
                    "handler_ms": [{"p50": 2.0, "p99": 4.0}, {"p50": 2.2, "p99": 5.0}]}]
    return {"history_mean": 5.0, "workers": [1, 2, 4], "requests": 1000, "cells": cells,
            "fits": serving_scale.fits(cells), "interleaved": interleaved}


def test_verdicts() -> None:
    verdicts = {name: (measured, met) for name, measured, met in serving_scale.verdicts(_scale()["cells"])}
    cold = next(v for k, v in verdicts.items() if k.startswith("10M users: cold start"))
    assert cold[1] is False and "serve 11.0 s" in cold[0]  # the 1M-item cell's serve start is over 10 s
    added = next(v for k, v in verdicts.items() if k.startswith("10M users: PSS added"))
    assert added == ("1M items x 10M users: 30.0 MB; 10k items x 10M users: 20.0 MB", True)
    small = next(v for k, v in verdicts.items() if "<= 10k items" in k)
    large = next(v for k, v in verdicts.items() if "> 10k items" in k)
    assert small[1] is True and large[1] is False
    assert all(met is None for _, _, met in serving_scale.verdicts([]))


def test_report_renders_the_serving_scale_section() -> None:
    results = {"command": "python -m bench --only serving-scale", "started_at": "2026-12-01T12:00:00+00:00",
               "duration_s": 60.0, "json": "bench-results/x.json", "notes": [], "serving_scale": _scale(),
               "machine": {"cpu": "Test CPU", "cores": 2, "ram_gib": 24.0, "load_avg": [1, 1, 1], "commit": "abc",
                           "dirty": False, "python": "3.11", "numpy": "2", "xgboost": "3", "omp_num_threads": "1"},
               "load_before": [1, 1, 1], "load_after": [1, 1, 1]}
    results["targets"] = report.targets(results)
    text = report.markdown(results)
    assert "## Serving at scale: catalog size x user count" in text
    assert ("| 10k items x 100k users | 500,000 | 47 | 400 | 900 | 1.50 / 0.75 | 0.50 / 0.20 / 0.10 | 6.0 / 3.0 |"
            in text)
    assert ("| 1M items x 10M users | 900 (598 + 302) | 930 (626 + 304) | 990 (682 + 308) | 30.00 | 28.00 | "
            "12.00 / 24.00 | 10 | 2.00 / 1.50 / 1.00 |") in text
    assert "400 bytes per user + 900 bytes per item" in text
    assert "- 10M users: PSS added per extra worker <= 50 MB: 1M items x 10M users: 30.0 MB; " in text
    assert "| 10k items | 100k users 2.00 / 4.00; 10M users 2.20 / 5.00 | 1.10x | 2.00 / 1.00 / 1.00 |" in text
    assert all(line.endswith("|") for line in text.splitlines() if line.startswith("|"))


def test_parse_smaps_rollup() -> None:
    text = ("55c1e595b000-7ffddccb3000 ---p 00000000 00:00 0                          [rollup]\n"
            "Rss:                1640 kB\nPss:                 262 kB\nPss_Anon:            112 kB\n"
            "Pss_File:            150 kB\n")
    assert serving_scale.parse_smaps_rollup(text) == {"Rss": 1640 / 1024, "Pss": 262 / 1024, "Pss_Anon": 112 / 1024,
                                                      "Pss_File": 150 / 1024}


def test_sparse_histories_have_the_amazon_shape() -> None:
    n_users, n_items = 20_000, 300
    history, seen = sparse_histories(n_users, n_items, 5.0, np.random.default_rng(0))
    lengths = np.diff(history.indptr)
    assert lengths.min() >= 1 and lengths.max() <= HISTORY_LENGTH
    assert 4.0 < lengths.mean() < 5.5  # repeats of a popular item within a user are dropped
    assert np.array_equal(history.indptr, seen.indptr)
    for u in np.random.default_rng(1).integers(0, n_users, 200):
        lo, hi = history.indptr[u], history.indptr[u + 1]
        assert np.all(np.diff(history.values[lo:hi]) >= 0)  # oldest first
        assert len(np.unique(seen.items[lo:hi])) == hi - lo
    assert seen is history  # every interaction is in the history
    counts = np.bincount(seen.items, minlength=n_items)
    assert counts.max() > 5 * np.median(counts)  # popularity-skewed
    with pytest.raises(ValueError):
        sparse_histories(10, 10, 0.5, np.random.default_rng(0))


def test_sparse_model_with_many_users_is_servable(tmp_path: Path) -> None:
    n_items, n_users = 200, 30_000
    write_synthetic_model(tmp_path / "model", n_items, n_users, history_mean=5.0, ann_min_items=0)
    artifact = load_artifact(tmp_path / "model", verify_checksums=True)
    assert 3.5 < len(artifact.seen_indices) / n_users < 5.5
    assert artifact.ann_index is not None and artifact.sequence_ann_index is not None
    ids = load_ids(tmp_path / "model", "user")
    picked = np.random.default_rng(2).integers(0, n_users, 100)
    assert np.array_equal(ids.positions([f"u{u}" for u in picked]), picked)
    assert ids.position("u-1") == -1 and ids.position(f"u{n_users}") == -1
    assert [ids[int(u)] for u in picked[:3]] == [f"u{u}" for u in picked[:3]]
    assert load_ids(tmp_path / "model", "item").position("i199") == 199
    recommender = TwoStageRecommender(artifact)
    answer = recommender.recommend(RecommendationRequest(user_id=f"u{n_users - 1}", top_k=5))
    assert answer.fallback is None and len(answer.items) == 5
    u = n_users - 1
    seen = set(artifact.item_ids[int(i)] for i in artifact.seen_indices[artifact.seen_indptr[u]:artifact.seen_indptr[u + 1]])
    assert not seen & {item["item_id"] for item in answer.items}
