"""Parity on MovieLens-100k: serving, asked at each validation query's time, computes exactly the
feature matrix training computed for it (every feature, the candidates in the same order) and gives
the same top 10. A ranker feature that serving computes differently fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.__main__ import main
from twostage_rec import allocator


def test_serving_computes_trainings_rows_for_sampled_ml_100k_validation_queries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: True)  # pytest's allocator stays as it is
    argv = ["run", "--dataset", "ml-100k", "--epochs", "3", "--sequence-epochs", "2", "--evaluation-users", "400",
            "--no-baselines", "--no-ablations", "--no-replay", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    parity = json.loads((tmp_path / "metrics.json").read_text())["parity"]
    for period in ("validation", "test"):
        found = parity[period]
        assert found["queries"] == 400, found
        assert found["same_candidates"] == found["same_features"] == found["same_top10"] == 400, found
        assert found["max_abs_feature_difference"] <= 1e-6, found
