"""The report's budget: which EASE lambdas run, when EASE and the ablations are skipped, and how it reads."""

from __future__ import annotations

import pytest

from training.report import format_ablations, format_table
from training.report_budget import UNLIMITED, EasePlan, ReportBudget, ablations_note, ease_matrix_mb, plan_ease

def test_ease_runs_in_full_up_to_its_grid_budget_then_chooses_lambda_on_the_popular_items() -> None:
    budget = ReportBudget(ease_mb=100.0, ease_grid_items=1000)
    assert plan_ease(1000, budget) == EasePlan(True)
    plan = plan_ease(2000, budget)
    assert plan.runs and plan.tuning_items == 1000
    assert plan.note is not None and "1,000 most popular of the 2,000 items" in plan.note and "8.0x" in plan.note


def test_ease_is_skipped_with_its_reason_when_its_matrix_is_over_the_budget() -> None:
    assert ease_matrix_mb(1024) == pytest.approx(4.0)  # float32
    assert plan_ease(1024, ReportBudget(ease_mb=4.0)).runs
    too_big = plan_ease(1025, ReportBudget(ease_mb=4.0))
    assert not too_big.runs and too_big.note is not None
    assert "1,025 x 1,025" in too_big.note and "(4 MB) is over the report's 4 MB budget" in too_big.note


def test_ablations_run_up_to_their_budget_of_interactions_x_items_and_say_why_above_it() -> None:
    budget = ReportBudget(ablation_cells=1e6)
    assert ablations_note(1000, 1000, budget) is None
    note = ablations_note(1001, 1000, budget)
    assert note is not None and "1,001 interactions x 1,000 items" in note and "--full-report" in note
    assert ablations_note(1_000_209, 3706) is None  # ML-1M keeps them by default


def test_the_full_report_lifts_every_limit() -> None:
    assert plan_ease(1_000_000, UNLIMITED) == EasePlan(True)
    assert ablations_note(10**9, 10**6, UNLIMITED) is None


def test_the_printed_report_shows_a_skip_and_a_cut_never_silently() -> None:
    block = {"hr@10": 0.2, "ndcg@10": 0.1, "recall@100": 0.5, "coverage@10": 0.3}
    metrics = {
        "two_stage": block,
        "ease": {**block, "note": "20,000 items: lambda tried in 300, 1000 only"},
        "svd": {"skipped": "no ratings"},
        "ablations": {"skipped": "2,400,000 ranker-period rows"},
    }
    table = format_table(metrics)
    assert "EASE: 20,000 items: lambda tried in 300, 1000 only" in table
    assert "Surprise SVD  skipped: no ratings" in table
    assert format_ablations(metrics) == "  skipped: 2,400,000 ranker-period rows"
    ran = {"two_stage": block, "ablations": {"without_mf": {**block, "ndcg@10": 0.08}}}
    assert "without_mf" in format_ablations(ran) and "-0.0200" in format_ablations(ran)
