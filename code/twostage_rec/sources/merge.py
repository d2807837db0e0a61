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

from twostage_rec.sources import Query, SourceResult

DEFAULT_FUSION_K = 60.0  # the usual RRF constant: rank 0 weighs about 2x rank 60


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

    def __init__(self, weights: Mapping[str, float], popular: PopularItems, k: float = DEFAULT_FUSION_K) -> None:
        if any(w < 0 for w in weights.values()) or k <= 0:
            raise ValueError(f"fusion needs weights >= 0 and k > 0, got {dict(weights)} and {k}")
        self.weights = dict(weights)
        self.k = k
        self._popular = popular

    def merge(self, queries: Sequence[Query], results: Mapping[str, Sequence[SourceResult]]) -> list[MergedCandidates]:
        """``results`` maps each source's name to its results, one per query."""
        return [self._one(q, {name: r[p] for name, r in results.items()}) for p, q in enumerate(queries)]

    def _one(self, query: Query, results: Mapping[str, SourceResult]) -> MergedCandidates:
        listed = [(name, r) for name, r in results.items() if len(r.item_idx)]
        pool = np.concatenate([r.item_idx for _, r in listed]) if listed else np.empty(0, dtype=np.int64)
        contribution = (
            np.concatenate([self.weights.get(name, 0.0) / (self.k + np.arange(len(r.item_idx))) for name, r in listed])
            if listed
            else np.empty(0)
        )
        distinct, inverse = np.unique(pool, return_inverse=True)
        fused = np.bincount(inverse, weights=contribution, minlength=len(distinct))
        # Best fusion score first; ties go to the lower item index (np.unique sorted them).
        order = np.argsort(-fused, kind="stable")[: query.n]
        item_idx, fusion = distinct[order], fused[order]
        if len(item_idx) < query.n:
            fill = self._popular.top(query.n - len(item_idx), np.concatenate([query.blocked, item_idx]), query.allowed)
            item_idx = np.concatenate([item_idx, fill])
            fusion = np.concatenate([fusion, np.zeros(len(fill))])
        scores, ranks = {}, {}
        for name, result in results.items():
            scores[name] = np.asarray(result.score_items(item_idx), dtype=np.float32)
            ranks[name] = _ranks(result.item_idx, item_idx)
        return MergedCandidates(item_idx.astype(np.int64), fusion.astype(np.float32), scores, ranks)


def _ranks(listed: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
    """0-based position of each of ``item_idx`` in ``listed``, NaN when absent."""
    out = np.full(len(item_idx), np.nan, dtype=np.float32)
    if not len(listed):
        return out
    order = np.argsort(listed)
    pos = np.minimum(np.searchsorted(listed, item_idx, sorter=order), len(listed) - 1)
    found = listed[order[pos]] == item_idx
    out[found] = order[pos[found]]
    return out
