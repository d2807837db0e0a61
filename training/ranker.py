"""Training, saving and loading of the stage-2 XGBoost ranker.

One row per (user, candidate) of a held-out period; the label is 1 for the item the user chose
next and 0 for the other candidates. ``rank:ndcg`` (LambdaMART) optimises the order within each
user (the query group); ``reg:logistic`` and ``reg:squarederror`` score each row on its own. The
pipeline trains the candidates and keeps the one with the best validation NDCG@10.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import xgboost

RankerObjective = Literal["rank:ndcg", "reg:logistic", "reg:squarederror"]

# Early stopping watches ranking quality within each user for both objectives: RMSE over 99
# zero labels per chosen item stops improving long before the order of the top 10 does.
_EVAL_METRIC = "ndcg@10"
_PROGRESS_PERIOD = 50
_MAX_EXP_GAIN_LABEL = 31  # XGBoost's bound on relevance degrees with the exponential NDCG gain


class _RoundProgress(xgboost.callback.TrainingCallback):
    """One line every ``_PROGRESS_PERIOD`` rounds of a fit with nothing to evaluate (a refit for
    fixed rounds), which XGBoost's own monitor would leave silent."""

    def __init__(self, rounds: int) -> None:
        super().__init__()
        self._rounds = rounds

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        if epoch % _PROGRESS_PERIOD == 0 or epoch + 1 == self._rounds:
            print(f"[{epoch}]\tround {epoch + 1} of {self._rounds}", flush=True)
        return False  # never stop early


@dataclass(frozen=True)
class RankerConfig:
    """XGBoost settings; ``nthread=0`` uses every core (training), serving predicts with 1."""

    objective: RankerObjective = "rank:ndcg"
    max_rounds: int = 500
    early_stopping_rounds: int = 30
    # Shallow, well-populated leaves: the validation period has one positive per user (~1% of
    # rows), and deeper trees overfit it within a handful of rounds (measured on ML-100k).
    learning_rate: float = 0.05
    max_depth: int = 4
    min_child_weight: float = 10.0
    seed: int = 0
    nthread: int = 0

    def __post_init__(self) -> None:
        if self.objective not in get_args(RankerObjective):
            raise ValueError(
                f"objective must be one of {get_args(RankerObjective)}, got {self.objective!r}"
            )
        for name in ("max_rounds", "early_stopping_rounds", "max_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.nthread < 0:
            raise ValueError(f"nthread must be >= 0, got {self.nthread}")


@dataclass(frozen=True)
class RankerResult:
    """A trained ranker holding exactly ``best_rounds`` trees.

    ``feature_importance`` is the total gain per feature (0.0 for unused ones) in feature order;
    ``history`` is XGBoost's ``evals_result`` of the held-out rows, ``{"valid": {metric: [value
    per round]}}`` (empty after a fixed-rounds refit).
    """

    booster: xgboost.Booster
    best_rounds: int
    feature_importance: dict[str, float]
    history: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def train_ranker(
    X: np.ndarray,
    y: np.ndarray,
    group_user_idx: np.ndarray,
    config: RankerConfig,
    feature_names: Sequence[str],
    valid_fraction: float = 0.2,
    fixed_rounds: int | None = None,
    eval_metric: str = _EVAL_METRIC,
    valid: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> RankerResult:
    """Train the ranker on rows ``X`` (NaN = missing) with labels ``y``, grouped by query.

    ``valid`` (X, y, groups of another period) drives early stopping when given; otherwise a
    seeded ``valid_fraction`` of the groups is held out (group-disjoint, so no query's candidates
    leak between the slices). Training stops after ``early_stopping_rounds`` without improvement.
    ``fixed_rounds`` refits on all rows for exactly that many rounds, no validation.
    Rows need not be sorted: they are grouped here, as ``rank:ndcg`` requires.
    """
    X, y, group_user_idx = _sorted_by_group(*_checked_inputs(X, y, group_user_idx, config, feature_names))
    params: dict[str, Any] = {
        "objective": config.objective,
        "eval_metric": eval_metric,
        "eta": config.learning_rate,
        "max_depth": config.max_depth,
        "min_child_weight": config.min_child_weight,
        "seed": config.seed,
        "tree_method": "hist",
    }
    if config.nthread > 0:
        params["nthread"] = config.nthread

    def matrix(rows: np.ndarray | slice) -> xgboost.DMatrix:
        qid = group_user_idx[rows]  # the ndcg@10 metric needs the groups for either objective
        return xgboost.DMatrix(
            X[rows], label=y[rows], qid=qid, feature_names=list(feature_names), missing=np.nan
        )

    history: dict[str, dict[str, list[float]]] = {}
    if fixed_rounds is not None:
        if fixed_rounds < 1:
            raise ValueError(f"fixed_rounds must be >= 1, got {fixed_rounds}")
        # No evaluation set, not even the training rows: their metric each round cost 12-18% of
        # the fit (ML-100k-sized rows) and decides nothing here. Progress comes from a callback.
        booster = xgboost.train(params, matrix(slice(None)), fixed_rounds, callbacks=[_RoundProgress(fixed_rounds)])
        best_rounds = fixed_rounds
    else:
        if valid is None:
            valid_rows = _validation_rows(group_user_idx, valid_fraction, config.seed)
            train, held_out = matrix(~valid_rows), matrix(valid_rows)
        else:
            train = matrix(slice(None))
            vx, vy, vg = _sorted_by_group(*_checked_inputs(*valid, config, feature_names))
            held_out = xgboost.DMatrix(vx, label=vy, qid=vg, feature_names=list(feature_names), missing=np.nan)
        # Only the held-out rows are evaluated: early stopping reads them, and the training rows'
        # metric each round would add 12-18% to the fit for a number nothing uses.
        booster = xgboost.train(
            params, train, config.max_rounds, evals=[(held_out, "valid")],
            early_stopping_rounds=config.early_stopping_rounds, evals_result=history,
            verbose_eval=_PROGRESS_PERIOD,
        )
        best_rounds = booster.best_iteration + 1
        # Drop the trees grown after the best round so any predict call (serving uses all trees)
        # gets the early-stopped model.
        booster = booster[:best_rounds]

    gain = booster.get_score(importance_type="gain")
    importance = {name: float(gain.get(name, 0.0)) for name in feature_names}
    return RankerResult(booster, best_rounds, importance, history)


def save_ranker(booster: xgboost.Booster, path: Path) -> None:
    """Save in XGBoost's own UBJSON format (no pickle); ``path`` must end in ``.ubj``."""
    path = Path(path)
    if path.suffix != ".ubj":
        raise ValueError(f"ranker path must end in '.ubj', got {path}")
    booster.save_model(path)


def load_ranker(path: Path) -> xgboost.Booster:
    """Load a ranker saved by :func:`save_ranker`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ranker file not found: {path}")
    booster = xgboost.Booster()
    booster.load_model(path)
    return booster


def _checked_inputs(
    X: np.ndarray,
    y: np.ndarray,
    group_user_idx: np.ndarray,
    config: RankerConfig,
    feature_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    group_user_idx = np.asarray(group_user_idx)
    if X.ndim != 2 or X.shape[1] != len(feature_names):
        raise ValueError(f"X must be (n_rows, {len(feature_names)}) to match feature_names, got {X.shape}")
    if y.shape != (len(X),) or group_user_idx.shape != (len(X),):
        raise ValueError(
            f"y {y.shape} and group_user_idx {group_user_idx.shape} must be ({len(X)},) like X"
        )
    if len(X) == 0:
        raise ValueError("cannot train a ranker on 0 rows")
    if not np.issubdtype(group_user_idx.dtype, np.integer):
        raise ValueError(f"group_user_idx must hold integer user indices, got {group_user_idx.dtype}")
    if not np.isfinite(y).all():
        raise ValueError(f"y has a non-finite label at row {int(np.argmin(np.isfinite(y)))}")
    if config.objective == "reg:logistic" and ((y < 0) | (y > 1)).any():
        bad = int(np.argmax((y < 0) | (y > 1)))
        raise ValueError(f"reg:logistic needs labels in [0, 1]; row {bad} has {y[bad]}")
    if config.objective == "rank:ndcg":
        bad = (y < 0) | (y > _MAX_EXP_GAIN_LABEL) | (y != np.round(y))
        if bad.any():
            raise ValueError(
                f"rank:ndcg needs integer relevance labels in [0, {_MAX_EXP_GAIN_LABEL}]; "
                f"row {int(np.argmax(bad))} has {y[np.argmax(bad)]}"
            )
    return X, y, group_user_idx


def _sorted_by_group(X: np.ndarray, y: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(group, kind="stable")
    return X[order], y[order], group[order]


def _validation_rows(group_user_idx: np.ndarray, valid_fraction: float, seed: int) -> np.ndarray:
    """Boolean row mask of a seeded, user-disjoint validation slice (at least one user each side)."""
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    users = np.unique(group_user_idx)
    if len(users) < 2:
        raise ValueError("early stopping needs rows of at least 2 users; pass fixed_rounds instead")
    n_valid = min(max(1, round(valid_fraction * len(users))), len(users) - 1)
    valid_users = np.random.default_rng(seed).permutation(users)[:n_valid]
    return np.isin(group_user_idx, valid_users)


def train_rating_model(
    X: np.ndarray,
    y: np.ndarray,
    group_user_idx: np.ndarray,
    config: RankerConfig,
    feature_names: Sequence[str],
    fixed_rounds: int | None = None,
    valid: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> RankerResult:
    """The ``predicted_rating`` model: XGBoost regression on the ratings of chosen candidates.

    The ranker orders candidates (its label counts "not chosen" as 0, so its output is not a
    rating); this model answers "what would the user rate it", on the same feature rows, trained
    only on the rows the user did choose (``y`` > 0 holds their ratings), early-stopped on RMSE
    (on the chosen rows of ``valid`` when given).
    """
    chosen = y > 0
    rating_config = replace(config, objective="reg:squarederror")
    if valid is not None:
        keep = valid[1] > 0
        valid = (valid[0][keep], valid[1][keep], valid[2][keep])
    return train_ranker(
        X[chosen], y[chosen], group_user_idx[chosen], rating_config, feature_names,
        fixed_rounds=fixed_rounds, eval_metric="rmse", valid=valid,
    )
