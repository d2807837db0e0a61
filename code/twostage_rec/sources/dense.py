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


def _scorer(item_vectors: np.ndarray, vector: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda item_idx: np.asarray(item_vectors[item_idx] @ vector, dtype=np.float32)
