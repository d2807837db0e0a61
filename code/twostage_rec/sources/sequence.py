"""The sequence model's source: a user vector computed from the history at request time."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from twostage_rec.retrieval import Retriever
from twostage_rec.schema import SOURCE_SEQUENCE
from twostage_rec.sequence_encoder import SequenceEncoder
from twostage_rec.sources import Query, SourceResult
from twostage_rec.sources.dense import dot_product_results


class SequenceSource:
    """Encodes each history with the sequence model, then one dot product with its item vectors.

    The vector depends only on the history, so a user the model has never seen gets candidates as
    soon as they have one known item, and a new interaction changes the next answer.
    """

    name = SOURCE_SEQUENCE

    def __init__(self, encoder: SequenceEncoder, item_vectors: np.ndarray, retriever: Retriever) -> None:
        self.encoder = encoder
        self._items = item_vectors
        self._retriever = retriever

    def run(self, queries: Sequence[Query]) -> list[SourceResult]:
        with_history = [p for p, q in enumerate(queries) if len(q.history)]
        vectors = (
            self.encoder.encode([queries[p].history.item_idx for p in with_history])
            if with_history
            else np.empty((0, self.encoder.spec.dim), dtype=np.float32)
        )
        return dot_product_results(queries, with_history, vectors, self._items, self._retriever)
