"""The original design's source: the user's matrix-factorization vector against every item."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from twostage_rec.retrieval import Retriever
from twostage_rec.schema import SOURCE_MF
from twostage_rec.sources import Query, SourceResult
from twostage_rec.sources.dense import dot_product_results


class MatrixFactorizationSource:
    """``[b_u, 1, e_u] . [1, b_i, e_i]``: one dot product is the whole MF score (biases folded in).

    The user vector is learned at training time, so only users known to the model get candidates.
    """

    name = SOURCE_MF

    def __init__(self, user_factors: np.ndarray, item_factors: np.ndarray, retriever: Retriever) -> None:
        self._users = user_factors
        self._items = item_factors
        self._retriever = retriever

    def run(self, queries: Sequence[Query]) -> list[SourceResult]:
        known = [p for p, q in enumerate(queries) if q.user_idx >= 0]
        vectors = np.asarray(self._users[[queries[p].user_idx for p in known]], dtype=np.float32)
        return dot_product_results(queries, known, vectors, self._items, self._retriever)
