"""Full-ranking metrics on matrices small enough to check by hand."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.metrics import (
    coverage_at_k,
    hit_rate_at_k,
    ndcg_at_k,
    popularity_ranking,
    recall_at_k,
    top_k_unseen,
)


def csr(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    indices = np.array([i for r in rows for i in r], dtype=np.int32)
    return indptr, indices


def test_top_k_unseen_by_hand() -> None:
    users = np.array([[1.0], [-1.0]], dtype=np.float32)
    items = np.array([[4.0], [3.0], [2.0], [1.0]], dtype=np.float32)
    ranked = top_k_unseen(users, items, np.array([0, 1]), *csr([[0], [3]]), k=2)
    assert ranked.dtype == np.int32
    np.testing.assert_array_equal(ranked, [[1, 2], [2, 1]])
    # user_idx selects and orders the rows.
    np.testing.assert_array_equal(top_k_unseen(users, items, np.array([1]), *csr([[0], [3]]), k=3), [[2, 1, 0]])


def test_ties_go_to_the_lower_item_index_even_at_the_cut() -> None:
    scores = np.array([0.0, 2.0, 5.0, 2.0, 2.0, 2.0, 2.0, 1.0] + [2.0] * 50)
    items = scores[:, None]
    ranked = top_k_unseen(np.ones((1, 1)), items, np.array([0]), *csr([[]]), k=3)
    np.testing.assert_array_equal(ranked, [[2, 1, 3]])
    ranked = top_k_unseen(np.ones((1, 1)), items, np.array([0]), *csr([[1]]), k=4)
    np.testing.assert_array_equal(ranked, [[2, 3, 4, 5]])


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_matches_a_brute_force_ranking_and_never_returns_a_seen_item(chunk_size: int) -> None:
    rng = np.random.default_rng(7)
    n_users, n_items, k = 9, 30, 5
    users = rng.normal(size=(n_users, 4)).astype(np.float32)
    items = rng.normal(size=(n_items, 4)).astype(np.float32)
    items[10] = items[3]  # a genuine tie
    seen = [sorted(rng.choice(n_items, size=rng.integers(0, 20), replace=False).tolist()) for _ in range(n_users)]
    user_idx = np.array([4, 0, 8, 8, 2])
    ranked = top_k_unseen(users, items, user_idx, *csr(seen), k=k, chunk_size=chunk_size)

    scores = users @ items.T
    for row, u in zip(ranked, user_idx):
        unseen = [i for i in range(n_items) if i not in seen[u]]
        expected = sorted(unseen, key=lambda i: (-scores[u, i], i))[:k]
        assert row.tolist() == expected
        assert not set(row.tolist()) & set(seen[u])


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.integers(-3, 3), min_size=1, max_size=12),  # few values: ties everywhere
    seen_mask=st.lists(st.booleans(), min_size=12, max_size=12),
    k=st.integers(1, 14),
)
def test_heavy_ties_match_a_stable_sort(scores: list[int], seen_mask: list[bool], k: int) -> None:
    items = np.array(scores, dtype=np.float32)[:, None]
    seen = [i for i in range(len(scores)) if seen_mask[i]]
    ranked = top_k_unseen(np.ones((1, 1), dtype=np.float32), items, np.array([0]), *csr([seen]), k=k)
    expected = sorted((i for i in range(len(scores)) if i not in seen), key=lambda i: (-scores[i], i))[:k]
    assert ranked[0].tolist() == expected + [-1] * (k - len(expected))


def test_fewer_unseen_items_than_k_pads_with_minus_one() -> None:
    items = np.arange(4, dtype=np.float32)[:, None]
    ranked = top_k_unseen(np.ones((2, 1)), items, np.array([0, 1]), *csr([[0, 1, 3], []]), k=6)
    np.testing.assert_array_equal(ranked, [[2, -1, -1, -1, -1, -1], [3, 2, 1, 0, -1, -1]])


def test_integer_vectors_and_empty_user_list() -> None:
    items = np.array([[1], [3], [2]])
    ranked = top_k_unseen(np.ones((1, 1), dtype=int), items, np.array([0]), *csr([[]]), k=2)
    np.testing.assert_array_equal(ranked, [[1, 2]])
    assert top_k_unseen(np.ones((1, 1)), items, np.array([], dtype=int), *csr([[]]), k=2).shape == (0, 2)


def test_bad_input_gets_a_clear_error() -> None:
    items = np.ones((3, 2))
    with pytest.raises(ValueError, match="same number of columns"):
        top_k_unseen(np.ones((1, 3)), items, np.array([0]), *csr([[]]), k=1)
    with pytest.raises(ValueError, match="user_idx out of range"):
        top_k_unseen(np.ones((1, 2)), items, np.array([1]), *csr([[]]), k=1)
    with pytest.raises(ValueError, match="NaN"):
        top_k_unseen(np.full((1, 2), np.nan), items, np.array([0]), *csr([[]]), k=1)
    with pytest.raises(ValueError, match="k"):
        top_k_unseen(np.ones((1, 2)), items, np.array([0]), *csr([[]]), k=0)


RANKED = np.array([[5, 2, 7], [1, 3, 4], [9, 8, 0]])
TARGET = np.array([2, 9, 0])  # rank 1, absent, rank 2


def test_hit_rate_recall_and_ndcg_by_hand() -> None:
    assert hit_rate_at_k(RANKED, TARGET, 3) == pytest.approx(2 / 3)
    assert hit_rate_at_k(RANKED, TARGET, 2) == pytest.approx(1 / 3)
    assert hit_rate_at_k(RANKED, TARGET, 1) == 0.0
    assert recall_at_k(RANKED, TARGET, 3) == hit_rate_at_k(RANKED, TARGET, 3)
    assert ndcg_at_k(RANKED, TARGET, 3) == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert ndcg_at_k(RANKED, TARGET, 2) == pytest.approx((1 / math.log2(3)) / 3)
    assert ndcg_at_k(np.array([[4, 1]]), np.array([4]), 2) == 1.0


def test_metric_errors() -> None:
    with pytest.raises(ValueError, match="ranking width"):
        hit_rate_at_k(RANKED, TARGET, 4)
    with pytest.raises(ValueError, match="target_idx"):
        ndcg_at_k(RANKED, TARGET[:2], 2)
    with pytest.raises(ValueError, match="zero users"):
        recall_at_k(np.zeros((0, 3), dtype=np.int32), np.zeros(0, dtype=np.int32), 3)


def test_coverage_counts_distinct_items_and_ignores_padding() -> None:
    ranked = np.array([[0, 1, 5], [1, 2, -1]])
    assert coverage_at_k(ranked, 10, 2) == pytest.approx(3 / 10)
    assert coverage_at_k(ranked, 10, 1) == pytest.approx(2 / 10)
    assert coverage_at_k(ranked, 10, 3) == pytest.approx(4 / 10)


def test_popularity_ranking_masks_seen_items() -> None:
    train_items = np.array([2, 2, 2, 1, 1, 0, 3, 3])
    ranked = popularity_ranking(train_items, 5, np.array([0, 1]), *csr([[2], []]), k=4)
    # counts: 0->1, 1->2, 2->3, 3->2, 4->0; the 1-vs-3 tie goes to item 1.
    np.testing.assert_array_equal(ranked, [[1, 3, 0, 4], [2, 1, 3, 0]])
    with pytest.raises(ValueError, match="train_item_idx"):
        popularity_ranking(np.array([5]), 5, np.array([0]), *csr([[]]), k=1)
