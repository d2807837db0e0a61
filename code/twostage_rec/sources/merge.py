"""Merging the sources' lists into one candidate list per query: weighted reciprocal-rank fusion.

A candidate's fusion score is ``sum over sources of weight_s / (k + rank_s)`` (rank 0-based, only
the sources that listed it). Ranks, not scores, so sources on different scales mix without
calibration; the weights and ``k`` are tuned on validation Recall@N at training time. The best
``n`` by fusion score are kept; if the sources together listed fewer than ``n`` allowed items,
the most popular allowed items fill the rest, so a query always gets exactly ``n`` candidates
when ``n`` allowed items exist.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from twostage_rec.sources import DENSE_KEYS, NO_SCORES, Query, SourceResult, key_positions
from twostage_rec.sources.dense import DotScorer, dot_scores

DEFAULT_FUSION_K = 60.0  # the usual RRF constant: rank 0 weighs about 2x rank 60
# Ranks are read through a dense (query, item) table when it has at most this many keys per listed
# item (and at most DENSE_KEYS), else by a sort and a search. A 100-user batch on ML-1M (37 keys
# an item): 0.09 ms against 0.96 ms; at 600 keys an item the sort won (0.8 against 1.4 ms).
RANK_TABLE_KEYS_PER_ENTRY = 64
# The dense sources' scores of the candidates come from one product per batch from this many
# queries on; below it (one call cost ~0.1 ms against ~0.01 ms for the query's own) per query.
BATCHED_SCORES_MIN_QUERIES = 8


@dataclass(frozen=True)
class MergedCandidates:
    """One query's candidates, best fusion score first, with what each source said of them."""

    item_idx: np.ndarray  # int64
    fusion_score: np.ndarray  # float32 (0 for popularity fill)
    source_scores: dict[str, np.ndarray]  # source name -> float32 score of each candidate (NaN: no opinion)
    source_ranks: dict[str, np.ndarray]  # source name -> float32 0-based rank in its list (NaN: not listed)


class PopularItems:
    """The training data's most popular items, for filling lists and for users with no history."""

    def __init__(self, popular_items: np.ndarray) -> None:
        self._popular = np.asarray(popular_items, dtype=np.int64)

    def top(self, n: int, blocked: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        """The ``n`` most popular items neither blocked nor disallowed."""
        keep = np.ones(len(self._popular), dtype=bool)
        if len(blocked):
            keep &= ~np.isin(self._popular, blocked)
        if allowed is not None:
            keep &= allowed[self._popular]
        return self._popular[keep][:n]


class CandidateMerger:
    """Fuses the sources' results for each query into exactly ``query.n`` candidates."""

    def __init__(
        self, weights: Mapping[str, float], popular: PopularItems, n_items: int, k: float = DEFAULT_FUSION_K
    ) -> None:
        if any(w < 0 for w in weights.values()) or k <= 0 or n_items < 1:
            raise ValueError(f"fusion needs weights >= 0, k > 0 and items, got {dict(weights)}, {k}, {n_items}")
        self.weights = dict(weights)
        self.k = k
        self.n_items = n_items
        self._popular = popular

    def merge(self, queries: Sequence[Query], results: Mapping[str, Sequence[SourceResult]]) -> list[MergedCandidates]:
        """``results`` maps each source's name to its results, one per query.

        One pass over every listed (query, item) of the batch: fusion scores by key, the best
        ``n`` per query by a single sort, each source's rank of each candidate by a search.
        """
        names = list(results)
        listed = {name: _listing(results[name]) for name in names}  # name -> (query, item, rank)
        query = np.concatenate([listed[n][0] for n in names]) if names else np.empty(0, np.int64)
        item = np.concatenate([listed[n][1] for n in names]) if names else np.empty(0, np.int64)
        weight = (
            np.concatenate([self.weights.get(n, 0.0) / (self.k + listed[n][2]) for n in names])
            if names
            else np.empty(0)
        )
        n_items = self.n_items
        keys, inverse = np.unique(query * n_items + item, return_inverse=True)
        fused = np.bincount(inverse, weights=weight, minlength=len(keys))
        owner, candidate = keys // n_items, keys % n_items
        # Per query: best fusion score first, ties to the lower item index; then the first n of each.
        order = np.lexsort((candidate, -fused, owner))
        owner, candidate, fused = owner[order], candidate[order], fused[order]
        starts = np.searchsorted(owner, np.arange(len(queries) + 1))
        out = []
        for p, q in enumerate(queries):
            a, b = starts[p], min(starts[p + 1], starts[p] + q.n)
            item_idx, fusion = candidate[a:b], fused[a:b]
            if len(item_idx) < q.n:
                fill = self._popular.top(q.n - len(item_idx), np.concatenate([q.blocked, item_idx]), q.allowed)
                item_idx = np.concatenate([item_idx, fill])
                fusion = np.concatenate([fusion, np.zeros(len(fill))])
            out.append((item_idx.astype(np.int64), fusion.astype(np.float32)))
        return self._annotate(out, results, listed)

    def _annotate(
        self,
        merged: list[tuple[np.ndarray, np.ndarray]],
        results: Mapping[str, Sequence[SourceResult]],
        listed: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    ) -> list[MergedCandidates]:
        """Each source's score and rank of every merged candidate."""
        lengths = np.array([len(m[0]) for m in merged], dtype=np.int64)
        row_query = np.repeat(np.arange(len(merged)), lengths)
        items = np.concatenate([m[0] for m in merged]) if merged else np.empty(0, np.int64)
        wanted = row_query * self.n_items + items
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        ranks = {name: _ranks_of(listed[name], wanted, self.n_items) for name in results}
        scores = {name: _scores_of(results[name], [m[0] for m in merged]) for name in results}
        return [
            MergedCandidates(
                item_idx,
                fusion,
                {name: scores[name][p] for name in results},
                {name: ranks[name][bounds[p] : bounds[p + 1]] for name in results},
            )
            for p, (item_idx, fusion) in enumerate(merged)
        ]


def _listing(found: Sequence[SourceResult]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, item, 0-based rank) of every item a source listed, over a batch of queries."""
    lengths = np.array([len(r.item_idx) for r in found], dtype=np.int64)
    query = np.repeat(np.arange(len(found)), lengths)
    item = np.concatenate([r.item_idx for r in found]).astype(np.int64) if len(found) else np.empty(0, np.int64)
    rank = np.arange(len(item)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return query, item, rank


def _scores_of(found: Sequence[SourceResult], items: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A source's float32 score of each query's ``items``: the dense sources' for the whole batch
    in one product (a call per query was ~15% of the merge on ML-1M's 100-user batches)."""
    out = [NO_SCORES] * len(found)
    batched: dict[int, list[tuple[int, DotScorer]]] = {}  # id(item vectors) -> (query, its scorer)
    for p, result in enumerate(found):
        scorer = result.score_items
        if isinstance(scorer, DotScorer):
            batched.setdefault(id(scorer.item_vectors), []).append((p, scorer))
        else:
            out[p] = np.asarray(scorer(items[p]), dtype=np.float32)
    for group in batched.values():
        if len(group) < BATCHED_SCORES_MIN_QUERIES:
            for p, scorer in group:
                out[p] = scorer(items[p])
            continue
        for (p, _), scores in zip(group, dot_scores([s for _, s in group], [items[p] for p, _ in group])):
            out[p] = scores
    return out


def _ranks_of(listing: tuple[np.ndarray, np.ndarray, np.ndarray], wanted: np.ndarray, n_items: int) -> np.ndarray:
    """Each wanted (query * n_items + item) key's rank in the listing, NaN when not listed."""
    query, item, rank = listing
    out = np.full(len(wanted), np.nan, dtype=np.float32)
    if not len(item):
        return out
    keys = query * n_items + item
    n_keys = int(max(keys.max(), wanted.max(initial=-1))) + 1
    pos = key_positions(keys, wanted, n_keys, n_keys <= min(DENSE_KEYS, RANK_TABLE_KEYS_PER_ENTRY * len(keys)))
    found = pos >= 0
    out[found] = rank[pos[found]]
    return out
