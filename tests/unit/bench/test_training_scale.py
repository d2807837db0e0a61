"""The training-scale benchmark's arithmetic and report, on hand-checkable numbers (no training)."""

from __future__ import annotations

import math

import pytest

from bench.training_scale import ScaleRun, growth_exponent, markdown_section, parse_size, synthetic_arguments


def test_growth_exponent_recovers_exact_power_laws() -> None:
    sizes = [1e6, 3e6, 1e7]
    assert growth_exponent(sizes, [2.0 * n for n in sizes]) == pytest.approx(1.0)
    assert growth_exponent(sizes, [5e-9 * n**2 for n in sizes]) == pytest.approx(2.0)
    assert growth_exponent(sizes, [7.0, 7.0, 7.0]) == pytest.approx(0.0)


def test_growth_exponent_is_the_least_squares_slope_by_hand() -> None:
    # log10 points (0, 0), (1, 1), (2, 3); means 1 and 4/3: slope = ((-1)(-4/3) + 0 + (1)(5/3)) / 2 = 1.5
    assert growth_exponent([1, 10, 100], [1, 10, 1000]) == pytest.approx(1.5)


def test_growth_exponent_without_a_slope_is_nan() -> None:
    assert math.isnan(growth_exponent([1e6], [3.0]))
    assert math.isnan(growth_exponent([1e6, 1e6], [3.0, 4.0]))
    assert math.isnan(growth_exponent([1e6, 2e6], [0.0, 4.0]))
    with pytest.raises(ValueError):
        growth_exponent([1, 2], [1.0])


def test_sizes_parse_with_suffixes() -> None:
    assert [parse_size(s) for s in ("1M", "300k", "1.5m", "2000")] == [1_000_000, 300_000, 1_500_000, 2000]
    with pytest.raises(ValueError):
        parse_size("0")


def test_the_media_shape_has_thirty_interactions_a_user_over_a_fixed_catalog() -> None:
    assert synthetic_arguments(1_000_000) == ["--n-interactions", "1000000"]
    # The 1M run: 33,334 users x 30 = 1,000,020 interactions over 20,000 items.
    assert synthetic_arguments(1_000_000, 20_000) == ["--n-users", "33334", "--n-items", "20000"]
    assert synthetic_arguments(3_000_000, 20_000) == ["--n-users", "100000", "--n-items", "20000"]


def _run(n: int, mf_s: float, mf_mb: float, wall_s: float) -> ScaleRun:
    return ScaleRun(
        n_interactions=n,
        n_users=n // 5,
        n_items=n // 50,
        seconds={"split": 10.0 * n / 1e6, "mf": mf_s, "artifact": 0.5},
        memory_mb={"split": 100.0 * n / 1e6, "mf": mf_mb, "artifact": 50.0},
        wall_s=wall_s,
        peak_mb=200.0 * n / 1e6,
        mf_best_epoch=3,
        ranker_queries=12_000,
    )


def test_markdown_section_tables_sizes_exponents_and_verdicts() -> None:
    # mf: time grows as n**2 (missed), memory as n (met); split is linear in both; artifact is tiny.
    runs = [_run(3_000_000, 90.0, 300.0, 100.0), _run(1_000_000, 10.0, 100.0, 60.0)]
    text = markdown_section(runs, "python -m bench.training_scale --sizes 1M,3M")
    lines = text.splitlines()
    assert lines[0] == "## Training at scale"
    rows = [line for line in lines if line.startswith(("| 1,000,000 |", "| 3,000,000 |"))]
    assert rows[0].startswith("| 1,000,000 | 200,000 | 20,000 | 10.0 s / 100 MB | 10.0 s / 100 MB | 0.5 s / 50 MB")
    assert rows[1].startswith("| 3,000,000 |")  # sorted by size whatever the input order
    mf = next(line for line in lines if line.startswith("| mf |"))
    assert mf == "| mf | 2.00 | **missed** | 1.00 | met |"
    split = next(line for line in lines if line.startswith("| split |"))
    assert split == "| split | 1.00 | met | 1.00 | met |"
    artifact = next(line for line in lines if line.startswith("| artifact |"))
    assert "not judged" in artifact
    assert "**missed** (see the table)" in text
    assert "1.7 min, within the 30-minute target (measured at 3M, not 10M)" in text


def test_markdown_section_reports_a_met_target_and_an_overrun() -> None:
    runs = [_run(1_000_000, 10.0, 100.0, 600.0), _run(10_000_000, 100.0, 1000.0, 2400.0)]
    text = markdown_section(runs, "cmd")
    assert "every judged stage): **met**." in text
    assert "40.0 min, **over** the 30-minute target." in text


def test_markdown_section_fits_cpu_time_when_every_run_has_it() -> None:
    runs = [_run(1_000_000, 10.0, 100.0, 60.0), _run(4_000_000, 40.0, 400.0, 200.0)]
    runs = [
        ScaleRun(**{**r.__dict__, "cpu_seconds": {"split": 1.0 * k, "mf": 8.0 * k * k, "artifact": 0.4}})
        for r, k in zip(runs, (1, 4))
    ]
    lines = markdown_section(runs, "cmd").splitlines()
    assert any(line.endswith("CPU time b |") for line in lines)
    mf = next(line for line in lines if line.startswith("| mf |"))
    assert mf.endswith("| 2.00 |")  # CPU 8 -> 128 over 1M -> 4M: exponent 2
    assert next(line for line in lines if line.startswith("| split |")).endswith("| 1.00 |")


def test_one_size_fits_no_exponent_and_claims_no_verdict() -> None:
    text = markdown_section([_run(3_000_000, 90.0, 300.0, 1500.0)], "cmd")
    assert "| mf | nan | n/a | nan | n/a |" in text
    assert "every judged stage): **not measured** (an exponent needs two sizes or more)." in text
    assert "25.0 min, within the 30-minute target (measured at 3M, not 10M)." in text


def test_the_run_s_peak_is_the_largest_of_its_stages_and_the_last_high_water_mark() -> None:
    # Each stage resets the high-water mark that ru_maxrss reads, so the child's ru_maxrss is only
    # the last stage's peak: an earlier, larger stage must still be the run's peak.
    metrics = {"n_interactions": 10, "n_users": 2, "n_items": 3, "memory_mb": {"refit": 900.0, "artifact": 400.0}}
    assert ScaleRun.from_metrics(metrics, wall_s=1.0, peak_mb=410.0).peak_mb == 900.0
    assert ScaleRun.from_metrics({**metrics, "memory_mb": {}}, wall_s=1.0, peak_mb=410.0).peak_mb == 410.0
