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

from twostage_rec.retrieval import mask_rows, top_n, top_n_rows
from twostage_rec.schema import SOURCE_NEIGHBOURS
from twostage_rec.sources import DENSE_KEYS, Query, SourceResult


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


# A batch sums into a dense array over every (query, item) key (one bincount, but a pass over all
# the keys) when there are at most DENSE_KEYS keys and at most DENSE_KEYS_PER_ENTRY per gathered
# entry; otherwise into its sorted distinct keys (a sort of the entries). One user on a 1M-item
# catalog gathers ~1,000 entries: a dense 1M-key array (and its top-n) cost ~6 ms of a ~24 ms
# request, the sort ~0.1 ms. Both give the same sums (each key's weights added in entry order).
DENSE_KEYS_PER_ENTRY = 16


class KeyedSums:
    """Sums of weights per int64 key in ``[0, n_keys)``, read back at any keys (0 where none)."""

    def __init__(self, keys: np.ndarray, weights: list[np.ndarray], n_keys: int) -> None:
        self.dense = n_keys <= min(DENSE_KEYS, DENSE_KEYS_PER_ENTRY * len(keys))
        if self.dense:
            self.sums = [np.bincount(keys, weights=w, minlength=n_keys) for w in weights]
        else:
            self.keys, inverse = np.unique(keys, return_inverse=True)
            self.sums = [np.bincount(inverse, weights=w, minlength=len(self.keys)) for w in weights]

    def at(self, wanted: np.ndarray) -> list[np.ndarray]:
        """Each weight's sums at ``wanted`` keys."""
        if self.dense:
            return [s[wanted] for s in self.sums]
        if not len(self.keys):
            return [np.zeros(len(wanted)) for _ in self.sums]
        pos = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        found = self.keys[pos] == wanted
        return [np.where(found, s[pos], 0.0) for s in self.sums]


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
        # decay ** age by table: numpy's power over a few hundred thousand ages costs ~6 ms a batch.
        weight = score * (self.decay ** np.arange(recent.shape[1]))[age]
        sums = KeyedSums(query * n_items + neighbour, [weight], len(queries) * n_items)
        if sums.dense:
            return self._top_rows(queries, recent[:, 0] >= 0, sums.sums[0].reshape(len(queries), n_items))
        keys, values = sums.keys, sums.sums[0]
        bounds = np.searchsorted(keys // n_items, np.arange(len(queries) + 1))
        for p, q in enumerate(queries):
            a, b = bounds[p], bounds[p + 1]
            if a < b:
                out[p] = self._top(q, keys[a:b] % n_items, values[a:b])
        return out

    @staticmethod
    def _top_rows(queries: Sequence[Query], has_recent: np.ndarray, sums: np.ndarray) -> list[SourceResult]:
        """:meth:`_top` of every query at once from the dense (queries, n_items) sums."""
        scores = np.where(sums > 0, sums, -np.inf).astype(np.float32)
        mask_rows(scores, [q.blocked for q in queries], [q.allowed for q in queries])
        found = top_n_rows(scores, [q.n if has else 0 for q, has in zip(queries, has_recent)])
        return [
            SourceResult(f.item_idx, f.score, _row_scorer(row)) if has else SourceResult.nothing()
            for f, row, has in zip(found, sums, has_recent)
        ]

    @staticmethod
    def _top(query: Query, item_idx: np.ndarray, sums: np.ndarray) -> SourceResult:
        """The best ``query.n`` of the items with a positive score, neither blocked nor disallowed."""
        scores = np.where(sums > 0, sums, -np.inf).astype(np.float32)
        if len(query.blocked):
            scores[np.isin(item_idx, query.blocked)] = -np.inf
        if query.allowed is not None:
            scores[~query.allowed[item_idx]] = -np.inf
        found = top_n(scores, query.n, item_idx)
        return SourceResult(found.item_idx, found.score, _scorer(item_idx, sums))


def recent_items(queries: Sequence[Query], depth: int) -> np.ndarray:
    """(queries, depth) item_idx of each query's last ``depth`` items, most recent first, -1 padded."""
    out = np.full((len(queries), depth), -1, dtype=np.int64)
    for p, q in enumerate(queries):
        last = q.history.recent(depth)
        out[p, : len(last)] = last
    return out


def _scorer(distinct: np.ndarray, sums: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda item_idx: lookup(distinct, sums, item_idx)


def _row_scorer(row: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda item_idx: row[item_idx].astype(np.float32)
