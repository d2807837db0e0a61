"""``bench.sequence_training`` on tiny shapes: each pair computes the same result (no timing asserts)."""

from __future__ import annotations

import pytest

from bench import sequence_training


def test_each_comparison_agrees_and_reports_both_timings() -> None:
    result = sequence_training.measure(n_targets=300, n_items=50, n_sampled_items=3000, repeats=2)
    for name in ("full_softmax", "sampled_softmax", "adam_step"):
        pair = result[name]
        assert pair["max_abs_diff"] < 1e-4, name
        assert pair["before_ms"]["n"] == pair["after_ms"]["n"] == 2
        assert pair["ratio"] == pytest.approx(pair["before_ms"]["p50"] / pair["after_ms"]["p50"])
    assert result["full_softmax"]["items"] == 50 and result["sampled_softmax"]["items"] == 3000


def test_the_command_line_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--targets", "64", "--items", "20", "--sampled-items", "2100", "--repeats", "1"]
    assert sequence_training.main(args) == 0
    assert '"adam_step"' in capsys.readouterr().out
