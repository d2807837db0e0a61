"""Full-ranking evaluation: periods, masking, standard errors, and the baselines on tiny data."""

from __future__ import annotations

import numpy as np
import pytest

from training.baselines import ease
from training.evaluation import Period, rank_dense, recall_curve, report
from training.interactions import Encoded, Histories


def histories(*sequences: list[int]) -> Histories:
    users = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    items = np.concatenate([np.array(s) for s in sequences])
    times = np.concatenate([np.arange(len(s)) * 10 for s in sequences])
    return Histories.of(Encoded(users, items, np.arange(len(items), dtype=np.float32), times), len(sequences))


def test_positions_make_one_query_per_late_interaction_with_its_prefix() -> None:
    h = histories([0, 1, 2, 3], [4, 5], [6])
    period = Period.positions(h, last=2, history_length=50)
    assert period.user_idx.tolist() == [0, 0, 1]  # user 1 has one item before its last; user 2 none
    assert period.target.tolist() == [2, 3, 5]
    assert period.prefix.tolist() == [2, 3, 1]
    assert period.at_time.tolist() == [20, 30, 10]
    queries = period.queries(10)
    assert queries[1].history.item_idx.tolist() == [0, 1, 2] and queries[1].blocked.tolist() == [0, 1, 2]
    assert queries[2].history.item_idx.tolist() == [4]
    short = Period.positions(h, last=2, history_length=2).queries(10)
    assert short[1].history.item_idx.tolist() == [1, 2] and short[1].blocked.tolist() == [0, 1, 2]


def test_rank_dense_masks_the_history_and_report_gives_means_with_standard_errors() -> None:
    h = histories([0, 1], [2])
    period = Period(np.array([0, 1]), np.array([3, 0]), np.array([0, 0]), h, 50)
    scores = np.array([[9.0, 8.0, 1.0, 2.0], [9.0, 0.0, 5.0, 1.0]], dtype=np.float32)
    ranking = rank_dense(period, lambda users: scores[users], depth=3)
    assert ranking.tolist() == [[3, 2, -1], [0, 3, 1]]  # user 0: items 0, 1 seen; user 1: item 2 seen
    got = report(ranking, period.target, n_items=4)
    assert got["hr@10"] == 1.0 and got["hr@10_se"] == 0.0
    assert got["ndcg@10"] == pytest.approx(1.0)
    assert got["coverage@10"] == pytest.approx(4 / 4)
    half = report(np.array([[1, 2], [0, 2]]), np.array([1, 3]), 4)
    assert half["hr@10"] == 0.5 and half["hr@10_se"] == pytest.approx(0.5)  # std of [1, 0] / sqrt(2)
    assert recall_curve(np.array([[5, 1, 2]]), np.array([1]), (1, 2, 3, 10)) == {1: 0.0, 2: 1.0, 3: 1.0}


def test_ease_reproduces_the_closed_form_on_a_tiny_matrix() -> None:
    h = histories([0, 1], [0, 1, 2], [2])
    model = ease.fit_ease(ease.item_gram(h, 3), lam=1.0)
    x = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=np.float64)
    p = np.linalg.inv(x.T @ x + np.eye(3))
    want = -p / np.diag(p)
    np.fill_diagonal(want, 0)
    np.testing.assert_allclose(model.weights(), want, rtol=1e-5, atol=1e-7)
    scores = model.scorer(h)(np.array([2, 0]))
    np.testing.assert_allclose(scores, x[[2, 0]] @ want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ease.EaseError, match="not positive definite"):
        ease.fit_ease(ease.item_gram(h, 3), lam=-5.0)


def test_float32_ease_in_place_equals_the_float64_inverse_on_a_catalog_of_several_blocks() -> None:
    # 2,500 items: the in-place mirror of the triangle crosses blocks of rows; random histories
    # with repeats (a repeat is still one) and items nobody saw (their row of X^T X is lambda I).
    rng = np.random.default_rng(0)
    n_users, n_items = 300, 2500
    users, items = rng.integers(0, n_users, 8000), rng.integers(0, n_items - 50, 8000)
    h = Histories.of(Encoded(users, items, np.ones(8000, np.float32), np.arange(8000)), n_users)
    x = ease.user_item_matrix(h, n_items).toarray().astype(np.float64)
    assert x.max() == 1.0
    p = np.linalg.inv(x.T @ x + 30.0 * np.eye(n_items))
    want = -p / np.diag(p)
    np.fill_diagonal(want, 0)
    model = ease.fit_ease(ease.item_gram(h, n_items), 30.0)
    assert model.p.dtype == np.float32 and model.p.flags.c_contiguous
    np.testing.assert_array_equal(model.p, model.p.T)
    np.testing.assert_allclose(model.weights(), want, atol=1e-5 * np.abs(want).max())  # float32's rounding
    np.testing.assert_allclose(model.scorer(h)(np.arange(20)), x[:20] @ want, atol=1e-5)


def test_ease_of_some_items_is_ease_of_their_columns_and_never_ranks_the_others() -> None:
    h = histories([0, 1, 3], [0, 1, 2, 3], [2, 3], [1, 4])
    items = np.array([1, 2, 3])
    model = ease.fit_ease(ease.item_gram(h, 5, items), lam=2.0)
    x = ease.user_item_matrix(h, 5).toarray().astype(np.float64)[:, items]
    p = np.linalg.inv(x.T @ x + 2.0 * np.eye(3))
    want = np.eye(3) - p / np.diag(p)
    np.testing.assert_allclose(model.weights(), want, rtol=1e-5, atol=1e-7)
    scores = model.scorer(h)(np.array([3, 0]))
    assert scores.shape == (2, 5) and np.isneginf(scores[:, [0, 4]]).all()
    np.testing.assert_allclose(scores[:, items], x[[3, 0]] @ want, rtol=1e-5, atol=1e-7)


def test_svd_baseline_scores_every_item_from_surprise_parameters() -> None:
    from training.baselines.svd import SvdConfig, fit_svd

    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 600), rng.integers(0, 20, 600)
    ratings = np.clip(np.round(3 + (items % 3) - (users % 2) + rng.normal(0, 0.3, 600)), 1, 5).astype(np.float32)
    data = Encoded(users, items, ratings, np.zeros(600, np.int64))
    model = fit_svd(data, 31, 21, (1.0, 5.0), SvdConfig(n_factors=4, n_epochs=30))
    scores = model.scorer()(np.array([0, 1, 30]))
    assert scores.shape == (3, 21)
    # Unseen user 30 and item 20 fall back to the biases they have (zero) around the mean.
    assert scores[2, 20] == pytest.approx(model.mean)
    # Items with item % 3 == 2 are rated higher for everyone.
    assert scores[0, [2, 5, 8]].mean() > scores[0, [0, 3, 6]].mean()


def test_paired_difference_and_per_user_ndcg() -> None:
    from training.evaluation import paired_difference, per_user_ndcg

    ndcg = per_user_ndcg(np.array([[4, 2], [1, 2], [0, 1]]), np.array([4, 2, 7]))
    np.testing.assert_allclose(ndcg, [1.0, 1 / np.log2(3), 0.0])
    d = paired_difference(np.array([1.0, 0.5, 0.0]), np.array([0.5, 0.5, 0.5]))
    assert d["mean"] == pytest.approx(0.0) and d["se"] == pytest.approx(np.std([0.5, 0.0, -0.5], ddof=1) / np.sqrt(3))


def test_histories_keep_time_order_and_cut_first_or_last() -> None:
    # Rows out of order; user 0's two rows at time 10 keep their input order (the split's tie order).
    data = Encoded(np.array([0, 1, 0, 0, 1]), np.array([5, 7, 3, 4, 8]), np.ones(5, np.float32),
                   np.array([20, 5, 10, 10, 1]))
    h = Histories.of(data, 3)
    assert h.user_items(0).tolist() == [3, 4, 5] and h.user_items(1).tolist() == [8, 7]
    assert h.lengths.tolist() == [3, 2, 0]
    assert h.last(2).user_items(0).tolist() == [4, 5] and h.last(2).timestamps.tolist() == [10, 20, 1, 5]
    assert h.first(np.array([1, 5, 0])).user_items(0).tolist() == [3]
    assert h.first(np.array([1, 5, 0])).user_items(1).tolist() == [8, 7]
    assert h.user_history(0, 2).item_idx.tolist() == [4, 5]
    back = h.encoded()
    assert back.user_idx.tolist() == [0, 0, 0, 1, 1] and back.item_idx.tolist() == [3, 4, 5, 8, 7]
