"""Item-to-item neighbours of the user's recent items: what people went on to next.

Each item keeps its top-M neighbours by windowed co-occurrence in time-ordered histories (built
at training time by ``training/models/neighbours.py``, linear in the interactions). A user's
score for an item is the sum of its neighbour scores from the user's last ``recent`` items, each
weighted ``decay ** age`` (age 0 = the latest item): what they did last counts most.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from twostage_rec.retrieval import top_n
from twostage_rec.schema import SOURCE_NEIGHBOURS
from twostage_rec.sources import Query, SourceResult


@dataclass(frozen=True)
class NeighbourLists:
    """Each item's neighbours, best first, as CSR by item_idx."""

    indptr: np.ndarray  # int64 (n_items + 1,)
    items: np.ndarray  # int32
    scores: np.ndarray  # float32

    @property
    def n_items(self) -> int:
        return len(self.indptr) - 1

    def gather(self, recent: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every neighbour entry of the items in ``recent`` ((queries, depth) item_idx, -1 = none):
        (query, age = column in ``recent``, neighbour item, score), one row per entry."""
        query, age = np.nonzero(recent >= 0)
        sources = recent[query, age]
        starts = self.indptr[sources]
        lengths = self.indptr[sources + 1] - starts
        total = int(lengths.sum())
        offsets = np.cumsum(lengths) - lengths
        positions = np.arange(total) - np.repeat(offsets - starts, lengths)
        return (
            np.repeat(query, lengths).astype(np.int64),
            np.repeat(age, lengths),
            self.items[positions].astype(np.int64),
            self.scores[positions].astype(np.float64),
        )


def lookup(distinct: np.ndarray, sums: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
    """``sums`` at ``item_idx`` (0 for items absent from ``distinct``), float32."""
    if not len(distinct):
        return np.zeros(len(item_idx), dtype=np.float32)
    pos = np.minimum(np.searchsorted(distinct, item_idx), len(distinct) - 1)
    return np.where(distinct[pos] == item_idx, sums[pos], 0.0).astype(np.float32)


class ItemNeighbourSource:
    """Decayed neighbour scores of the user's ``recent`` last items; only items with a score > 0."""

    name = SOURCE_NEIGHBOURS

    def __init__(self, lists: NeighbourLists, recent: int, decay: float) -> None:
        if recent < 1 or not 0.0 < decay <= 1.0:
            raise ValueError(f"item neighbours need recent >= 1 and decay in (0, 1], got {recent}, {decay}")
        self.lists = lists
        self.recent = recent
        self.decay = decay

    def run(self, queries: Sequence[Query]) -> list[SourceResult]:
        """Every query's scores in one pass over the gathered neighbour rows; a top-n per query."""
        out = [SourceResult.nothing()] * len(queries)
        recent = recent_items(queries, self.recent)
        query, age, neighbour, score = self.lists.gather(recent)
        if not len(query):
            return out
        n_items = self.lists.n_items
        keys, inverse = np.unique(query * n_items + neighbour, return_inverse=True)
        sums = np.bincount(inverse, weights=score * self.decay**age, minlength=len(keys))
        owner, item_idx = keys // n_items, keys % n_items
        usable = sums > 0
        blocked = np.concatenate([p * n_items + q.blocked.astype(np.int64) for p, q in enumerate(queries)])
        usable &= ~np.isin(keys, blocked)
        bounds = np.searchsorted(owner, np.arange(len(queries) + 1))
        for p, q in enumerate(queries):
            a, b = bounds[p], bounds[p + 1]
            if a == b:
                continue
            ok = usable[a:b] if q.allowed is None else usable[a:b] & q.allowed[item_idx[a:b]]
            found = top_n(np.where(ok, sums[a:b], -np.inf).astype(np.float32), q.n, item_idx[a:b])
            out[p] = SourceResult(found.item_idx, found.score, _scorer(item_idx[a:b], sums[a:b]))
        return out


def recent_items(queries: Sequence[Query], depth: int) -> np.ndarray:
    """(queries, depth) item_idx of each query's last ``depth`` items, most recent first, -1 padded."""
    out = np.full((len(queries), depth), -1, dtype=np.int64)
    for p, q in enumerate(queries):
        last = q.history.recent(depth)
        out[p, : len(last)] = last
    return out


def _scorer(distinct: np.ndarray, sums: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda item_idx: lookup(distinct, sums, item_idx)
