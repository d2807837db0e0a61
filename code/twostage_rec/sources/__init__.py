"""Stage 1: candidate sources behind one Protocol, merged into one candidate list per user.

Each source has one job: given queries (a user, their history, what they must not see), return
its best unseen items. :class:`~twostage_rec.sources.merge.CandidateMerger` fuses the lists into
exactly ``n`` candidates per query (when ``n`` allowed items exist) and records each source's
score and rank of every candidate for the ranker.

- :class:`~twostage_rec.sources.mf.MatrixFactorizationSource`: the user's MF vector . item vectors.
- :class:`~twostage_rec.sources.neighbours.ItemNeighbourSource`: neighbours of the recent items.
- :class:`~twostage_rec.sources.sequence.SequenceSource`: the sequence model's vector of the history.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from twostage_rec.history import UserHistory

# The most (query, item) keys a batch spreads over a dense array (sums, lookups) instead of
# sorting them: 4M keys, 32 MB of float64 sums.
DENSE_KEYS = 1 << 22


def key_positions(keys: np.ndarray, wanted: np.ndarray, n_keys: int, dense: bool) -> np.ndarray:
    """The position in ``keys`` (distinct int64 keys in ``[0, n_keys)``) of each ``wanted`` key,
    -1 where it is not one: through a dense key -> position table (``dense``, the caller's choice:
    cheap when ``n_keys`` is small beside the keys looked at) or a search in the sorted keys."""
    if dense:
        table = np.full(n_keys, -1, dtype=np.int32 if len(keys) < 2**31 - 1 else np.int64)  # int32: half to fill
        table[keys] = np.arange(len(keys))
        return table[wanted]
    if not len(keys):
        return np.full(len(wanted), -1, dtype=np.int64)
    order = np.argsort(keys)
    pos = order[np.minimum(np.searchsorted(keys, wanted, sorter=order), len(keys) - 1)]
    return np.where(keys[pos] == wanted, pos, -1)


NO_ITEMS = np.empty(0, dtype=np.int64)
NO_SCORES = np.empty(0, dtype=np.float32)


@dataclass(frozen=True)
class Query:
    """One user's request as stage 1 sees it."""

    user_idx: int  # -1 when the model does not know the user
    history: UserHistory  # merged: the artifact's, Feature Store's and the request's, oldest first
    blocked: np.ndarray  # int64 item_idx that must not be returned (seen, history, excluded)
    allowed: np.ndarray | None  # bool (n_items,) filter mask; None = every item allowed
    n: int  # candidates wanted


def _no_opinion(item_idx: np.ndarray) -> np.ndarray:
    return np.full(len(item_idx), np.nan, dtype=np.float32)


@dataclass(frozen=True)
class SourceResult:
    """A source's best items for one query, best first, and its score for any other item."""

    item_idx: np.ndarray  # int64
    score: np.ndarray  # float32, same order
    score_items: Callable[[np.ndarray], np.ndarray] = _no_opinion  # NaN where the source has no opinion

    @classmethod
    def nothing(cls) -> SourceResult:
        return cls(NO_ITEMS, NO_SCORES)


class CandidateSource(Protocol):
    """Anything that proposes candidates for a batch of queries."""

    name: str

    def run(self, queries: Sequence[Query]) -> list[SourceResult]:
        """One result per query, in order; at most ``query.n`` items, none blocked or disallowed."""
        ...
