"""Integer-indexed interactions, and each user's interactions as a time-ordered sequence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.indexing import IdIndex
from twostage_rec import schema
from twostage_rec.history import UserHistory


_CHECK_CHUNK_ROWS = 1 << 16


@dataclass(frozen=True)
class Encoded:
    """Aligned arrays of an interaction table (one row per interaction)."""

    user_idx: np.ndarray  # int64
    item_idx: np.ndarray  # int64
    rating: np.ndarray  # float32
    timestamp: np.ndarray  # int64 epoch seconds

    @classmethod
    def of(cls, frame: pd.DataFrame, users: IdIndex, items: IdIndex) -> Encoded:
        return cls(
            users.idx(frame[schema.USER_ID]).astype(np.int64),
            items.idx(frame[schema.ITEM_ID]).astype(np.int64),
            frame[schema.RATING].to_numpy(np.float32, copy=True),
            frame[schema.TIMESTAMP].to_numpy(np.int64),
        )

    def __len__(self) -> int:
        return len(self.user_idx)

    def take(self, rows: np.ndarray) -> Encoded:
        return Encoded(self.user_idx[rows], self.item_idx[rows], self.rating[rows], self.timestamp[rows])

    def concat(self, other: Encoded) -> Encoded:
        return Encoded(*(np.concatenate([a, b]) for a, b in zip(self.__dict__.values(), other.__dict__.values())))


@dataclass(frozen=True)
class Histories:
    """Every user's interactions in time order, as CSR by user_idx.

    Rows keep their input order among equal timestamps, so the split's tie order (a keyed hash,
    never the item id) carries through.
    """

    indptr: np.ndarray  # int64 (n_users + 1,)
    items: np.ndarray  # int64
    timestamps: np.ndarray  # int64
    ratings: np.ndarray  # float32

    @classmethod
    def of(cls, data: Encoded, n_users: int) -> Histories:
        order = np.lexsort((np.arange(len(data)), data.timestamp, data.user_idx))
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(data.user_idx, minlength=n_users), out=indptr[1:])
        return cls(indptr, data.item_idx[order], data.timestamp[order], data.rating[order])

    @classmethod
    def of_sorted(cls, data: Encoded, n_users: int) -> Histories:
        """:meth:`of` for rows already in (user, time) order: no sort. Raises ValueError otherwise."""
        users, times = data.user_idx, data.timestamp
        # In chunks that overlap by a row: whole-array temporaries at 10M rows cost more in fresh
        # pages than the comparisons themselves.
        for start in range(0, max(len(users) - 1, 0), _CHECK_CHUNK_ROWS):
            chunk = slice(start, start + _CHECK_CHUNK_ROWS + 1)
            user_step = np.diff(users[chunk])
            if not ((user_step > 0) | ((user_step == 0) & (np.diff(times[chunk]) >= 0))).all():
                raise ValueError("rows are not in (user, time) order")
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
        return cls(indptr, data.item_idx, data.timestamp, data.rating)

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def user_items(self, user_idx: int) -> np.ndarray:
        return self.items[self.indptr[user_idx] : self.indptr[user_idx + 1]]

    def user_history(self, user_idx: int, max_length: int) -> UserHistory:
        """The user's last ``max_length`` interactions, as serving sees a history."""
        a, b = self.indptr[user_idx], self.indptr[user_idx + 1]
        a = max(a, b - max_length)
        return UserHistory(self.items[a:b], self.timestamps[a:b])

    def last(self, n: int) -> Histories:
        """Each user's last ``n`` interactions (the artifact's ordered history)."""
        lengths = np.minimum(self.lengths, n)
        starts = self.indptr[1:] - lengths
        rows = np.arange(int(lengths.sum())) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        indptr = np.zeros_like(self.indptr)
        np.cumsum(lengths, out=indptr[1:])
        return Histories(indptr, self.items[rows], self.timestamps[rows], self.ratings[rows])

    def first(self, lengths: np.ndarray) -> Histories:
        """Each user's first ``lengths[u]`` interactions (an earlier cut of the same data)."""
        lengths = np.minimum(np.asarray(lengths, dtype=np.int64), self.lengths)
        rows = np.arange(int(lengths.sum())) + np.repeat(self.indptr[:-1] - (np.cumsum(lengths) - lengths), lengths)
        indptr = np.zeros_like(self.indptr)
        np.cumsum(lengths, out=indptr[1:])
        return Histories(indptr, self.items[rows], self.timestamps[rows], self.ratings[rows])

    def encoded(self) -> Encoded:
        users = np.repeat(np.arange(self.n_users, dtype=np.int64), self.lengths)
        return Encoded(users, self.items, self.ratings, self.timestamps)
