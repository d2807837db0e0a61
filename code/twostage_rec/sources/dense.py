"""What the dense sources share: query vectors against item vectors through a retriever."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from twostage_rec.retrieval import Retriever
from twostage_rec.sources import Query, SourceResult


def dot_product_results(
    queries: Sequence[Query],
    positions: Sequence[int],
    vectors: np.ndarray,
    item_vectors: np.ndarray,
    retriever: Retriever,
) -> list[SourceResult]:
    """One result per query: the top items of ``vectors[i]`` for ``queries[positions[i]]``,
    nothing for the queries not in ``positions``."""
    out = [SourceResult.nothing()] * len(queries)
    if not len(positions):
        return out
    chosen = [queries[p] for p in positions]
    found = retriever.top(vectors, [q.n for q in chosen], [q.blocked for q in chosen], [q.allowed for q in chosen])
    for p, vector, c in zip(positions, vectors, found):
        out[p] = SourceResult(c.item_idx, c.score, _scorer(item_vectors, vector))
    return out


class DotScorer:
    """A dense source's score of any item for one query: ``item_vectors[item_idx] . vector``.

    A class, not a closure, so that the merger can score a whole batch's candidates with one
    gather and one row-wise product (:func:`dot_scores`) instead of a call per query.
    """

    __slots__ = ("item_vectors", "vector")

    def __init__(self, item_vectors: np.ndarray, vector: np.ndarray) -> None:
        self.item_vectors = item_vectors
        self.vector = vector

    def __call__(self, item_idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.item_vectors[item_idx] @ self.vector, dtype=np.float32)


def dot_scores(scorers: Sequence[DotScorer], items: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``[scorers[i](items[i]) ...]`` for scorers over the same item vectors, in one product
    (the sums in another order: equal to float32 rounding)."""
    lengths = np.array([len(i) for i in items], dtype=np.int64)
    if not lengths.sum():
        return [np.empty(0, dtype=np.float32) for _ in items]
    vectors = np.stack([s.vector for s in scorers])[np.repeat(np.arange(len(items)), lengths)]
    flat = np.einsum("rd,rd->r", scorers[0].item_vectors[np.concatenate(items)], vectors).astype(np.float32)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [flat[bounds[i] : bounds[i + 1]] for i in range(len(items))]


def _scorer(item_vectors: np.ndarray, vector: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return DotScorer(item_vectors, vector)
