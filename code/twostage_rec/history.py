"""A user's recent interactions, in time order: what the history-aware parts of the model read.

The artifact supplies each known user's last ``history_length`` interactions at training time;
fresh events (from the user-history Feature Store group, or ``recent_items`` in the request) are
merged in at request time, so a new interaction counts without retraining.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_NO_ITEMS = np.empty(0, dtype=np.int64)
_NO_TIMES = np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class UserHistory:
    """Item indices and their epoch-second timestamps, oldest first."""

    item_idx: np.ndarray  # int64
    timestamps: np.ndarray  # int64, non-decreasing

    @classmethod
    def empty(cls) -> UserHistory:
        return cls(_NO_ITEMS, _NO_TIMES)

    def __len__(self) -> int:
        return len(self.item_idx)

    @property
    def last_timestamp(self) -> int | None:
        return int(self.timestamps[-1]) if len(self.timestamps) else None

    def recent(self, n: int) -> np.ndarray:
        """The last ``n`` items, most recent first."""
        return self.item_idx[::-1][:n]


def merge_histories(parts: Sequence[UserHistory], max_length: int) -> UserHistory:
    """Union of ``parts`` deduplicated on (item, timestamp), in time order, the last ``max_length``.

    A part need not be in time order (``recent_items`` with timestamps may come in any order).

    Equal timestamps keep the order of ``parts`` and of the items inside each part, so the
    artifact's history goes first, then Feature Store's, then the request's.
    """
    non_empty = [p for p in parts if len(p)]
    if not non_empty:
        return UserHistory.empty()
    if len(non_empty) == 1 and (np.diff(non_empty[0].timestamps) >= 0).all():
        only = non_empty[0]
        return UserHistory(only.item_idx[-max_length:], only.timestamps[-max_length:])
    items = np.concatenate([p.item_idx for p in non_empty]).astype(np.int64, copy=False)
    times = np.concatenate([p.timestamps for p in non_empty]).astype(np.int64, copy=False)
    order = np.lexsort((np.arange(len(items)), times))
    items, times = items[order], times[order]
    # Duplicates are adjacent only if they share a timestamp: dedupe on the (time, item) pair.
    _, first = np.unique(np.stack([times, items]), axis=1, return_index=True)
    keep = np.sort(first)
    return UserHistory(items[keep][-max_length:], times[keep][-max_length:])
