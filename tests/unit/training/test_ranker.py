"""The XGBoost ranker on tiny planted problems: it learns, stops early, saves and loads exactly."""

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest

from training import ranker, ranker_features
from training.ranker import RankerConfig, load_ranker, save_ranker, train_ranker

FEATURES = ranker_features.ranker_feature_names(["mf", "item_neighbours", "sequence"])
PLANTED = FEATURES.index("item_avg_rating")
FAST = {"max_rounds": 60, "early_stopping_rounds": 10, "max_depth": 3, "learning_rate": 0.3,
        "nthread": 1}


def planted_problem(n_users: int = 100, per_user: int = 20, seed: int = 0):
    """One chosen candidate per user, and only the planted feature tells which: it is 5 higher."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_users * per_user, len(FEATURES))).astype(np.float32)
    X[rng.random(X.shape) < 0.05] = np.nan  # missing values must be fine
    groups = np.repeat(np.arange(n_users), per_user)
    chosen = np.arange(n_users) * per_user + rng.integers(0, per_user, n_users)
    X[chosen, PLANTED] = rng.normal(size=n_users) + 5.0
    y = np.zeros(len(X), dtype=np.float32)
    y[chosen] = 4.0
    shuffled = rng.permutation(len(X))  # the trainer must not rely on grouped input
    return X[shuffled], y[shuffled], groups[shuffled]


def top1_hit_rate(booster, X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    scores = booster.inplace_predict(X)
    hits = [y[rows][np.argmax(scores[rows])] > 0 for rows in
            (np.flatnonzero(groups == g) for g in np.unique(groups))]
    return float(np.mean(hits))


@pytest.mark.parametrize("objective", ["reg:squarederror", "rank:ndcg", "reg:logistic"])
def test_learns_the_planted_feature(objective) -> None:
    X, y, groups = planted_problem()
    y = np.minimum(y, 1.0) if objective == "reg:logistic" else y  # a probability: chosen or not
    result = train_ranker(X, y, groups, RankerConfig(objective=objective, **FAST), FEATURES)
    X_new, y_new, groups_new = planted_problem(seed=1)
    assert top1_hit_rate(result.booster, X_new, y_new, groups_new) > 0.9  # chance is 0.05
    assert max(result.feature_importance, key=result.feature_importance.get) == FEATURES[PLANTED]


def test_result_names_features_and_keeps_only_the_best_rounds() -> None:
    X, y, groups = planted_problem()
    config = RankerConfig(**{**FAST, "max_rounds": 200, "early_stopping_rounds": 5})
    result = train_ranker(X, y, groups, config, FEATURES)
    assert list(result.feature_importance) == list(FEATURES)
    assert all(isinstance(v, float) and v >= 0 for v in result.feature_importance.values())
    valid_ndcg = result.history["valid"]["ndcg@10"]
    assert result.best_rounds < len(valid_ndcg) <= 200  # it stopped early...
    assert result.booster.num_boosted_rounds() == result.best_rounds  # ...and dropped the rest
    assert valid_ndcg[result.best_rounds - 1] == max(valid_ndcg)
    assert result.booster.feature_names == list(FEATURES)


def test_fixed_rounds_refits_on_all_rows_without_validation() -> None:
    X, y, groups = planted_problem()
    result = train_ranker(X, y, groups, RankerConfig(**FAST), FEATURES, fixed_rounds=7)
    assert result.best_rounds == 7 and result.booster.num_boosted_rounds() == 7
    assert result.history == {}  # nothing is evaluated in a refit


def test_only_the_held_out_rows_are_evaluated(capsys: pytest.CaptureFixture[str]) -> None:
    X, y, groups = planted_problem()
    result = train_ranker(X, y, groups, RankerConfig(**FAST), FEATURES)
    assert set(result.history) == {"valid"}
    train_ranker(X, y, groups, RankerConfig(**FAST), FEATURES, fixed_rounds=7)
    assert "round 7 of 7" in capsys.readouterr().out  # a refit still shows its progress


def test_training_is_deterministic() -> None:
    X, y, groups = planted_problem()
    first, second = (train_ranker(X, y, groups, RankerConfig(**FAST), FEATURES) for _ in range(2))
    np.testing.assert_array_equal(first.booster.inplace_predict(X), second.booster.inplace_predict(X))


def test_validation_slice_is_user_disjoint_and_seeded() -> None:
    groups = np.repeat(np.arange(50), 3)
    mask = ranker._validation_rows(groups, 0.2, seed=3)
    assert not set(groups[mask]) & set(groups[~mask])
    assert len(set(groups[mask])) == 10
    np.testing.assert_array_equal(mask, ranker._validation_rows(groups, 0.2, seed=3))
    assert not np.array_equal(mask, ranker._validation_rows(groups, 0.2, seed=4))
    assert ranker._validation_rows(np.array([5, 9]), 0.01, seed=0).sum() == 1


def test_save_load_round_trips_predictions_exactly(tmp_path: Path) -> None:
    X, y, groups = planted_problem()
    booster = train_ranker(X, y, groups, RankerConfig(**FAST), FEATURES).booster
    path = tmp_path / "ranker.ubj"
    save_ranker(booster, path)
    assert path.read_bytes()[:1] == b"{"  # a UBJSON object, not a pickle stream
    loaded = load_ranker(path)
    np.testing.assert_array_equal(loaded.inplace_predict(X), booster.inplace_predict(X))
    assert loaded.feature_names == list(FEATURES)
    with pytest.raises(ValueError, match="must end in '.ubj'"):
        save_ranker(booster, tmp_path / "ranker.pkl")
    with pytest.raises(FileNotFoundError, match="ranker file not found"):
        load_ranker(tmp_path / "missing.ubj")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"X": np.zeros((4, 3))}, "X must be"),
        ({"y": np.zeros(3)}, "must be \\(4,\\) like X"),
        ({"y": np.array([0, 1, np.nan, 0])}, "non-finite label at row 2"),
        ({"group_user_idx": np.array([0.0, 0, 1, 1])}, "integer user indices"),
        ({"group_user_idx": np.zeros(4, dtype=int)}, "at least 2 users"),
        ({"valid_fraction": 1.0}, "valid_fraction must be in"),
        ({"config": RankerConfig(objective="rank:ndcg"), "y": np.array([0, 4.5, 0, 1])},
         "integer relevance labels in \\[0, 31\\]; row 1 has 4.5"),
        ({"fixed_rounds": 0}, "fixed_rounds must be >= 1"),
    ],
)
def test_bad_training_inputs_get_clear_messages(kwargs, message) -> None:
    args = {"X": np.zeros((4, len(FEATURES))), "y": np.array([0, 4, 0, 0]),
            "group_user_idx": np.array([0, 0, 1, 1]), "config": RankerConfig(nthread=1),
            "feature_names": FEATURES, **kwargs}
    with pytest.raises(ValueError, match=message):
        train_ranker(**args)


@pytest.mark.parametrize(
    "bad", [{"objective": "binary:logistic"}, {"max_rounds": 0}, {"learning_rate": 0.0},
            {"nthread": -1}]
)
def test_config_rejects_bad_values(bad) -> None:
    with pytest.raises(ValueError):
        RankerConfig(**bad)


@pytest.mark.parametrize("module", [ranker, ranker_features])
def test_nothing_uses_pickle(module) -> None:
    tree = ast.parse(inspect.getsource(module))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"pickle", "joblib", "cloudpickle", "dill"}
    assert "allow_pickle=True" not in inspect.getsource(module)
