"""The ranker's direct XGBoost calls give exactly what ``inplace_predict`` gives."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import xgboost as xgb

from twostage_rec.ranking import DensePredictor


@pytest.fixture(scope="module", params=["rank:ndcg", "reg:squarederror"])
def booster(request: pytest.FixtureRequest) -> xgb.Booster:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 6)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan  # missing values take each split's default branch
    y = (np.nan_to_num(x[:, 0]) + rng.normal(scale=0.5, size=600) > 0.5).astype(np.float32)
    data = xgb.DMatrix(x, label=y, qid=np.repeat(np.arange(60), 10), missing=np.nan)
    params = {"objective": request.param, "max_depth": 3, "nthread": 1, "seed": 0}
    return xgb.train(params, data, num_boost_round=20)


def rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    return x


def test_the_pinned_xgboost_is_called_directly_with_a_proxy_per_thread(booster: xgb.Booster) -> None:
    predict = DensePredictor(booster)
    assert predict.direct
    assert predict._proxy().value is not None and predict._proxy().value == predict._proxy().value
    other: list[int | None] = []
    thread = threading.Thread(target=lambda: other.append(predict._proxy().value))
    thread.start()
    thread.join()
    assert other[0] is not None and other[0] != predict._proxy().value


def test_threads_predicting_at_once_each_get_their_own_rows(booster: xgb.Booster) -> None:
    predict = DensePredictor(booster)
    inputs = [rows(int(n), seed) for seed, n in enumerate([1, 7, 50, 100, 3, 20, 64, 9])]
    expected = [booster.inplace_predict(x, validate_features=False) for x in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(5):
            got = list(pool.map(predict, inputs * 4))
            for x_index, result in enumerate(got):
                np.testing.assert_array_equal(result, expected[x_index % len(inputs)])


@pytest.mark.parametrize("n", [1, 10, 100])
def test_direct_predictions_equal_inplace_predict(booster: xgb.Booster, n: int) -> None:
    predict = DensePredictor(booster)
    x = rows(n, n)
    expected = booster.inplace_predict(x, validate_features=False)
    got = predict(x)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_array_equal(got, expected)
    # Any layout or dtype: converted to C-ordered float32 first, as XGBoost itself would read it.
    np.testing.assert_array_equal(predict(np.asfortranarray(x.astype(np.float64))), expected)
    wide = np.hstack([x, x])[:, :6]  # a non-contiguous view
    np.testing.assert_array_equal(predict(wide), expected)


def test_each_result_is_a_copy_the_next_call_does_not_overwrite(booster: xgb.Booster) -> None:
    predict = DensePredictor(booster)
    first_x, second_x = rows(10, 1), rows(10, 2)
    first = predict(first_x)
    predict(second_x)
    np.testing.assert_array_equal(first, booster.inplace_predict(first_x, validate_features=False))


def test_without_the_c_function_it_falls_back_to_inplace_predict(booster: xgb.Booster) -> None:
    predict = DensePredictor(booster)
    predict._predict = None
    assert not predict.direct
    x = rows(10, 3)
    np.testing.assert_array_equal(predict(x), booster.inplace_predict(x, validate_features=False))


def test_xgboosts_own_error_is_raised_for_the_wrong_width(booster: xgb.Booster) -> None:
    with pytest.raises(xgb.core.XGBoostError, match="Number of columns"):
        DensePredictor(booster)(np.zeros((2, 4), dtype=np.float32))
