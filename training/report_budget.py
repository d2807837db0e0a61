"""What the report may cost: the baselines and ablations a run adds to the model it ships.

The report compares the two-stage model with baselines (EASE, Surprise SVD) and with itself
retrained without each part (the ablations). None of that is shipped, so none of it may cost
more than the model: each part whose cost grows past a fixed budget is cut down or skipped, and
every cut is written into metrics.json and the printed report, never silent.

- EASE holds a dense ``n_items x n_items`` float32 matrix and pays ``n_items^3`` flops a fit
  (``training/baselines/ease.py``): it runs only where the matrix fits :attr:`ReportBudget.ease_mb`,
  and above :attr:`ReportBudget.ease_grid_items` items its lambda is chosen on that many most
  popular items, so the whole catalog is fit once (the test model) instead of once per lambda.
- The ablations retrain the ranker once per left-out part: above
  :attr:`ReportBudget.ablation_cells` interactions x items they are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EASE_BYTES_PER_CELL = 4  # P is float32 (training/baselines/ease.py)
# EASE's matrix: 2 GB holds a 23,170-item catalog's. With the data of a 1M-interaction run
# (about 1.4 GB resident) the whole process stays under 4 GB.
EASE_MB = 2048.0
# EASE's lambdas: each is a fit (n_items^3 flops), and the test refit is one more. Up to this many
# items every lambda is fit on the whole catalog; above it they are tried on this many most
# popular items and only the test model is fit on the whole catalog (a fit costs n_items^3: 8x as
# much at 20,000 items as at 10,000).
EASE_GRID_ITEMS = 10_000
# The ablations retrain the ranker once per left-out part (four times): as much as the ranker stage
# and more, whatever the catalog. They run up to this many interactions x items: ML-1M's 1M x
# 3,706 (3.7e9) runs them, a 1M-interaction run over 20,000 items (2e10) goes without.
ABLATION_CELLS = 1e10


@dataclass(frozen=True)
class ReportBudget:
    """Limits on the report's own work; the defaults keep a 1M-interaction run under 4 GB."""

    ease_mb: float = EASE_MB
    ease_grid_items: float = EASE_GRID_ITEMS
    ablation_cells: float = ABLATION_CELLS


UNLIMITED = ReportBudget(math.inf, math.inf, math.inf)  # ``--full-report``


@dataclass(frozen=True)
class EasePlan:
    """Whether EASE runs, and on how many items its lambda is chosen (None: the whole catalog)."""

    runs: bool
    tuning_items: int | None = None
    note: str | None = None  # for metrics.json and the printed report; None: EASE in full


def ease_matrix_mb(n_items: int) -> float:
    """EASE's dense matrix in MB."""
    return n_items * n_items * EASE_BYTES_PER_CELL / 2**20


def plan_ease(n_items: int, budget: ReportBudget = ReportBudget()) -> EasePlan:
    """EASE in full, with its lambda chosen on the most popular items only, or skipped.

    The dense matrix must fit ``budget.ease_mb``. Above ``budget.ease_grid_items`` items the
    lambda grid runs on that many most popular items (each fit there costs a fraction of one on
    the whole catalog) and the whole catalog is fit once, for the test.
    """
    matrix_mb = ease_matrix_mb(n_items)
    if matrix_mb > budget.ease_mb:
        return EasePlan(
            False,
            note=f"{n_items:,} items: EASE's dense {n_items:,} x {n_items:,} matrix ({matrix_mb:,.0f} MB) is over "
            f"the report's {budget.ease_mb:,.0f} MB budget",
        )
    if n_items <= budget.ease_grid_items:
        return EasePlan(True)
    tuning = int(budget.ease_grid_items)
    return EasePlan(
        True,
        tuning,
        f"lambda chosen on validation with the {tuning:,} most popular of the {n_items:,} items (a fit of every item "
        f"costs {(n_items / tuning) ** 3:.1f}x as much); the test model is fit on every item",
    )


def ablations_note(n_interactions: int, n_items: int, budget: ReportBudget = ReportBudget()) -> str | None:
    """Why the ablations are skipped (interactions x items over the budget), or None to run them."""
    cells = float(n_interactions) * n_items
    if cells <= budget.ablation_cells:
        return None
    return (
        f"{n_interactions:,} interactions x {n_items:,} items ({cells:.1e}) is over the report's "
        f"{budget.ablation_cells:.1e}: each ablation retrains the ranker (--full-report runs them)"
    )
