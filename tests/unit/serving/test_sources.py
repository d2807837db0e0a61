"""Stage 1 on hand-checkable inputs: neighbour accumulation, fusion, the popularity fill, history merging."""

from __future__ import annotations

import numpy as np
import pytest

from twostage_rec.history import UserHistory, merge_histories
from twostage_rec.sources import Query, SourceResult
from twostage_rec.sources import merge as merge_module
from twostage_rec.sources.dense import DotScorer, dot_scores
from twostage_rec.sources.merge import CandidateMerger, PopularItems, _ranks_of
from twostage_rec.sources.neighbours import ItemNeighbourSource, NeighbourLists, lookup

NONE = np.empty(0, dtype=np.int64)

# 0 -> [1 (0.9), 2 (0.5)], 1 -> [0 (0.9), 3 (0.2)], 2 -> [], 3 -> [4 (1.0)], 4 -> [].
LISTS = NeighbourLists(
    indptr=np.array([0, 2, 4, 4, 5, 5], dtype=np.int64),
    items=np.array([1, 2, 0, 3, 4], dtype=np.int32),
    scores=np.array([0.9, 0.5, 0.9, 0.2, 1.0], dtype=np.float32),
)


def history(*items: int) -> UserHistory:
    return UserHistory(np.array(items, dtype=np.int64), np.arange(len(items), dtype=np.int64) * 10)


def query(h: UserHistory, blocked: list[int] | None = None, allowed: np.ndarray | None = None, n: int = 10) -> Query:
    return Query(-1, h, np.array(h.item_idx.tolist() if blocked is None else blocked, dtype=np.int64), allowed, n)


def test_gather_lists_every_neighbour_entry_of_every_query_and_lookup_defaults_to_zero() -> None:
    query, age, neighbour, score = LISTS.gather(np.array([[1, 0], [2, -1], [3, 0]]))
    assert query.tolist() == [0, 0, 0, 0, 2, 2, 2]
    assert age.tolist() == [0, 0, 1, 1, 0, 1, 1]
    assert neighbour.tolist() == [0, 3, 1, 2, 4, 1, 2]  # item 2 has no neighbours: query 1 has none
    np.testing.assert_allclose(score, [0.9, 0.2, 0.9, 0.5, 1.0, 0.9, 0.5])
    assert len(LISTS.gather(np.full((2, 3), -1))[0]) == 0
    distinct, sums = np.array([1, 3]), np.array([0.5, 0.25])
    np.testing.assert_allclose(lookup(distinct, sums, np.array([3, 4, 1])), [0.25, 0.0, 0.5])
    assert lookup(np.empty(0, np.int64), np.empty(0), np.array([1])).tolist() == [0.0]


def test_neighbour_source_decays_by_recency_and_masks_before_top_n() -> None:
    source = ItemNeighbourSource(LISTS, recent=20, decay=0.5)
    # Latest item 1 (weight 1): 0 -> 0.9, 3 -> 0.2; then item 0 (weight 0.5): 1 -> 0.45, 2 -> 0.25.
    got, other = source.run([query(history(0, 1)), query(history(3))])
    assert other.item_idx.tolist() == [4]  # queries of one batch do not mix
    assert got.item_idx.tolist() == [2, 3]  # 0 and 1 are blocked (seen)
    np.testing.assert_allclose(got.score, [0.25, 0.2])
    np.testing.assert_allclose(got.score_items(np.array([0, 3, 4])), [0.9, 0.2, 0.0])
    allowed = np.array([True, True, False, True, True])
    assert source.run([query(history(0, 1), allowed=allowed)])[0].item_idx.tolist() == [3]
    assert source.run([query(history(0, 1), n=1)])[0].item_idx.tolist() == [2]
    only_latest = ItemNeighbourSource(LISTS, recent=1, decay=0.5).run([query(history(0, 1))])[0]
    assert only_latest.item_idx.tolist() == [3]


def test_neighbour_source_has_nothing_for_an_empty_history_or_items_without_neighbours() -> None:
    source = ItemNeighbourSource(LISTS, recent=20, decay=0.7)
    assert len(source.run([query(UserHistory.empty())])[0].item_idx) == 0
    assert len(source.run([query(history(2, 4))])[0].item_idx) == 0
    assert np.isnan(SourceResult.nothing().score_items(np.array([1]))).all()
    with pytest.raises(ValueError):
        ItemNeighbourSource(LISTS, recent=0, decay=0.7)


def _result(items: list[int]) -> SourceResult:
    return SourceResult(np.array(items, dtype=np.int64), np.linspace(1, 0, len(items)).astype(np.float32))


def test_fusion_is_weighted_reciprocal_rank_and_records_each_source() -> None:
    merger = CandidateMerger({"a": 1.0, "b": 2.0}, PopularItems(np.array([9, 8, 7])), 10, k=1.0)
    q = query(UserHistory.empty(), blocked=[], n=3)
    merged = merger.merge([q], {"a": [_result([5, 6])], "b": [_result([6, 4])]})[0]
    # a: 5 -> 1/1, 6 -> 1/2; b: 6 -> 2/1, 4 -> 2/2  =>  6: 2.5, 4: 1.0, 5: 1.0 (tie: lower index)
    assert merged.item_idx.tolist() == [6, 4, 5]
    np.testing.assert_allclose(merged.fusion_score, [2.5, 1.0, 1.0])
    np.testing.assert_array_equal(merged.source_ranks["a"], [1, np.nan, 0])
    np.testing.assert_array_equal(merged.source_ranks["b"], [0, 1, np.nan])


def test_fusion_fills_from_popular_items_to_exactly_n_when_they_exist() -> None:
    merger = CandidateMerger({"a": 1.0}, PopularItems(np.array([3, 2, 1, 0, 4])), 5)
    q = query(UserHistory.empty(), blocked=[2], n=4)
    merged = merger.merge([q], {"a": [_result([4])]})[0]
    assert merged.item_idx.tolist() == [4, 3, 1, 0]  # 2 is blocked; 4 was already listed
    assert merged.fusion_score[1:].tolist() == [0.0, 0.0, 0.0]
    few = merger.merge([query(UserHistory.empty(), blocked=[0, 1, 2, 3], n=4)], {"a": [_result([])]})[0]
    assert few.item_idx.tolist() == [4]  # only one allowed item is left


@pytest.mark.parametrize("dense", [True, False])
def test_ranks_of_candidates_in_a_batch_of_lists(dense: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not dense:  # the sort and search of a large catalog
        monkeypatch.setattr(merge_module, "DENSE_KEYS", 0)
    listing = (np.array([0, 0, 0, 1]), np.array([7, 3, 9, 3]), np.array([0, 1, 2, 0]))
    wanted = np.array([0 * 10 + 9, 0 * 10 + 1, 0 * 10 + 7, 1 * 10 + 3, 1 * 10 + 7])
    np.testing.assert_array_equal(_ranks_of(listing, wanted, 10), [2, np.nan, 0, 0, np.nan])
    empty = (np.empty(0, np.int64),) * 3
    assert np.isnan(_ranks_of(empty, np.array([1]), 10)).all()


def test_a_batch_merges_like_its_queries_one_at_a_time() -> None:
    rng = np.random.default_rng(0)
    merger = CandidateMerger({"a": 1.0, "b": 0.5}, PopularItems(np.arange(50)), 50)
    queries = [query(UserHistory.empty(), blocked=list(rng.choice(50, 5, replace=False)), n=8) for _ in range(6)]

    def listed(q: Query) -> SourceResult:  # sources never return a blocked item
        free = np.setdiff1d(np.arange(50), q.blocked)
        return _result(list(rng.choice(free, rng.integers(0, 12), replace=False)))

    results = {name: [listed(q) for q in queries] for name in ("a", "b")}
    batch = merger.merge(queries, results)
    for p, q in enumerate(queries):
        alone = merger.merge([q], {name: [found[p]] for name, found in results.items()})[0]
        assert batch[p].item_idx.tolist() == alone.item_idx.tolist() and len(alone.item_idx) == 8
        assert not set(alone.item_idx.tolist()) & set(q.blocked.tolist())
        for name in ("a", "b"):
            np.testing.assert_array_equal(batch[p].source_ranks[name], alone.source_ranks[name])


def test_large_catalogs_sum_by_sorted_keys_with_the_same_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    from twostage_rec.sources import neighbours as neighbours_module

    source = ItemNeighbourSource(LISTS, recent=20, decay=0.5)
    queries = [query(history(0, 1)), query(history(3)), query(UserHistory.empty())]
    dense = source.run(queries)
    monkeypatch.setattr(neighbours_module, "DENSE_KEYS", 0)
    sparse = source.run(queries)
    for a, b in zip(dense, sparse):
        assert a.item_idx.tolist() == b.item_idx.tolist()
        np.testing.assert_allclose(a.score, b.score)
        np.testing.assert_allclose(a.score_items(np.arange(5)), b.score_items(np.arange(5)))


def test_keyed_sums_go_sparse_when_the_keys_far_outnumber_the_entries() -> None:
    from twostage_rec.sources.neighbours import DENSE_KEYS_PER_ENTRY, KeyedSums

    rng = np.random.default_rng(0)
    limit = DENSE_KEYS_PER_ENTRY * 1_000  # the most keys 1,000 entries are summed densely over
    keys = rng.integers(0, limit, 1_000)
    weights = [rng.random(1_000), rng.random(1_000)]
    dense, sparse = KeyedSums(keys, weights, limit), KeyedSums(keys, weights, limit + 1)
    assert dense.dense and not sparse.dense
    assert not KeyedSums(keys, weights, 1_000_000).dense  # one user's entries on a 1M-item catalog
    wanted = np.concatenate([keys[:50], np.setdiff1d(np.arange(200), keys)[:10]])  # listed and unlisted
    for d, sp, w in zip(dense.at(wanted), sparse.at(wanted), weights):
        np.testing.assert_array_equal(d, sp)  # the same additions in the same order
        np.testing.assert_allclose(sp, [w[keys == k].sum() for k in wanted])


def test_merge_histories_dedupes_keeps_time_order_and_the_last_n() -> None:
    stored = UserHistory(np.array([1, 2, 3]), np.array([10, 20, 30]))
    store = UserHistory(np.array([3, 4]), np.array([30, 40]))  # 3@30 repeats the stored one
    request = UserHistory(np.array([5, 6]), np.array([40, 35]))  # out of order and a tie at 40
    merged = merge_histories([stored, store, request], max_length=10)
    assert merged.item_idx.tolist() == [1, 2, 3, 6, 4, 5]
    assert merged.timestamps.tolist() == [10, 20, 30, 35, 40, 40]
    assert merge_histories([stored, store, request], max_length=2).item_idx.tolist() == [4, 5]
    assert len(merge_histories([UserHistory.empty()], 5)) == 0
    assert history(1, 2, 3).recent(2).tolist() == [3, 2]


@pytest.mark.parametrize("min_queries", [1, 8])
def test_dense_scores_of_a_batch_equal_each_querys_own_call(min_queries: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(merge_module, "BATCHED_SCORES_MIN_QUERIES", min_queries)  # 1: batched in the merger
    rng = np.random.default_rng(3)
    item_vectors = rng.normal(size=(40, 8)).astype(np.float32)
    scorers = [DotScorer(item_vectors, rng.normal(size=8).astype(np.float32)) for _ in range(4)]
    items = [rng.choice(40, 6, replace=False), np.empty(0, np.int64), rng.choice(40, 1), np.arange(40)]
    for scorer, lst, got in zip(scorers, items, dot_scores(scorers, items)):
        assert got.dtype == np.float32 and got.shape == lst.shape
        np.testing.assert_allclose(got, scorer(lst), rtol=1e-5, atol=1e-6)
    # In the merger, a source's dense scorers are batched; any other scorer is called as it is.
    found = [SourceResult(NONE, NONE.astype(np.float32), scorers[0]), SourceResult.nothing(),
             SourceResult(NONE, NONE.astype(np.float32), scorers[3])]
    got = merge_module._scores_of(found, [items[0], items[0], items[3]])
    np.testing.assert_allclose(got[0], scorers[0](items[0]), rtol=1e-5, atol=1e-6)
    assert np.isnan(got[1]).all() and len(got[1]) == 6
    np.testing.assert_allclose(got[2], scorers[3](items[3]), rtol=1e-5, atol=1e-6)
