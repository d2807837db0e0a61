"""Point-in-time statistics of users and items: the one implementation that training, the offline
evaluation and serving all call.

A ranker feature is a function of (what the user did up to ``as_of``, what is known about the items at
``as_of``, ``as_of``). The clock is always an argument, never read here. A :class:`Timeline` holds
each entity's interactions in time order (CSR by the entity's index) with running rating sums, so the
count, the mean rating and the first time of an entity's interactions strictly before any moment are a
binary search and two lookups.

What a model knows ends at its ``data_end`` (one second after its newest interaction). Windowed item
statistics are taken at ``min(as_of, data_end)``: asked after training, the endpoint answers with the
newest statistics it has instead of inventing an empty week (the staleness this leaves is measured by
the replay evaluation, ``training/replay.py``), and no item statistic can leave the range it had in
training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from twostage_rec import schema

SECONDS_PER_HOUR: Final = 3600.0
SECONDS_PER_DAY: Final = 86_400.0
RECENT_WINDOW_S: Final = 30 * 86_400  # "recent" popularity: what is being watched or bought now
WEEK_WINDOW_S: Final = 7 * 86_400  # with the 30-day count, whether an item is rising or fading

USER_FEATURES: Final = (schema.USER_MEAN_RATING, schema.USER_RATING_COUNT)
ITEM_TIME_FEATURES: Final = (
    schema.ITEM_AVG_RATING,
    schema.ITEM_RATING_COUNT,
    schema.ITEM_RECENT_COUNT,
    schema.ITEM_WEEK_COUNT,
    schema.ITEM_TREND,
    schema.ITEM_DAYS_SINCE_FIRST,
)


@dataclass(frozen=True)
class Timeline:
    """Every entity's interactions in time order, CSR by entity index.

    ``rating_sums[j]`` is the sum of the entity's ratings up to and including row ``j`` (it restarts
    at each entity, so another entity's rows never change this one's float rounding).
    """

    indptr: np.ndarray  # int64 (n_entities + 1,)
    timestamps: np.ndarray  # int64 epoch seconds, non-decreasing within each entity
    rating_sums: np.ndarray  # float64 running sums within each entity

    @classmethod
    def build(
        cls, entity_idx: np.ndarray, timestamps: np.ndarray, ratings: np.ndarray, n_entities: int
    ) -> Timeline:
        """The timeline of interaction rows (any order; equal times keep their input order)."""
        entity_idx = np.asarray(entity_idx, dtype=np.int64)
        timestamps = np.asarray(timestamps, dtype=np.int64)
        order = np.lexsort((timestamps, entity_idx))
        counts = np.bincount(entity_idx, minlength=n_entities)
        indptr = np.zeros(n_entities + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr, timestamps[order], running_sums(indptr, np.asarray(ratings, dtype=np.float64)[order]))

    @property
    def n_entities(self) -> int:
        return len(self.indptr) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def end_before(self, idx: np.ndarray, at_time: np.ndarray, inclusive: bool = False) -> np.ndarray:
        """For each query, the row just past the entity's last interaction before ``at_time``
        (strictly before; at or before with ``inclusive``). ``idx`` must be valid entity indices."""
        idx = np.asarray(idx, dtype=np.int64)
        at_time = np.asarray(at_time, dtype=np.int64)
        start, end = self.indptr[idx], self.indptr[idx + 1]
        position = start.copy()
        if not len(self.timestamps) or not len(idx):
            return position
        # Binary lifting: every query moves forward by each power of two, largest first, while the
        # row it would step past is still before its time. As many steps as the longest timeline
        # has bits, each a few vector operations over all the queries at once.
        longest = int((end - start).max(initial=0))
        step = 1 << max(longest.bit_length() - 1, 0)
        last_row = len(self.timestamps) - 1
        while step:
            candidate = position + step
            seen = self.timestamps[np.minimum(candidate - 1, last_row)]
            earlier = seen <= at_time if inclusive else seen < at_time
            position = np.where((candidate <= end) & earlier, candidate, position)
            step >>= 1
        return position

    def before(self, idx: np.ndarray, at_time: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query: count, rating sum (NaN without rows) and first timestamp (NaN without rows) of
        the entity's interactions strictly before ``at_time``. ``idx`` -1 is an entity without rows."""
        idx = np.asarray(idx, dtype=np.int64)
        at_time = np.broadcast_to(np.asarray(at_time, dtype=np.int64), idx.shape)
        if not len(self.timestamps):
            return np.zeros(len(idx)), np.full(len(idx), np.nan), np.full(len(idx), np.nan)
        known = idx >= 0
        safe = np.where(known, idx, 0)
        start = self.indptr[safe]
        count = np.where(known, self.end_before(safe, at_time) - start, 0)
        has_rows = count > 0
        rating_sum = np.where(has_rows, self.rating_sums[np.where(has_rows, start + count - 1, 0)], np.nan)
        first = np.where(has_rows, self.timestamps[np.where(has_rows, start, 0)], np.nan)
        return count.astype(np.float64), rating_sum, first


def running_sums(indptr: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Cumulative sums of ``values`` that restart at every CSR row (float64)."""
    sums = np.cumsum(values, dtype=np.float64)
    lengths = np.diff(indptr)
    offset = np.concatenate([[0.0], sums])[indptr[:-1]]
    return sums - np.repeat(offset, lengths)


def item_statistics(timeline: Timeline, item_idx: np.ndarray, as_of: np.ndarray, data_end: int) -> np.ndarray:
    """The items' time-dependent features (``ITEM_TIME_FEATURES``) as of each query's ``as_of``:
    float32 ``(len(item_idx), len(ITEM_TIME_FEATURES))``.

    Aggregates count interactions strictly before ``min(as_of, data_end)``; an item without any has
    count 0 and NaN for its mean, trend and age (XGBoost treats NaN as missing).
    """
    item_idx = np.asarray(item_idx, dtype=np.int64)
    at = np.minimum(np.broadcast_to(np.asarray(as_of, dtype=np.int64), item_idx.shape), int(data_end))
    # One search for the three moments: the queries three times over.
    counts, sums, firsts = timeline.before(
        np.concatenate([item_idx] * 3), np.concatenate([at, at - RECENT_WINDOW_S, at - WEEK_WINDOW_S])
    )
    n = len(item_idx)
    count, before_month, before_week = counts[:n], counts[n : 2 * n], counts[2 * n :]
    recent, week = count - before_month, count - before_week
    with np.errstate(invalid="ignore", divide="ignore"):
        average = sums[:n] / count
        # Daily rate over the last week relative to the last 30 days: > 1 rising, < 1 fading.
        trend = np.where(recent > 0, (week / 7.0) / (recent / 30.0), np.nan)
    age_days = (at - firsts[:n]) / SECONDS_PER_DAY
    return np.column_stack([average, count, recent, week, trend, age_days]).astype(np.float32)


def user_statistics(
    timeline: Timeline, user_idx: np.ndarray, as_of: np.ndarray, later_events: np.ndarray | None = None
) -> np.ndarray:
    """The users' features (``USER_FEATURES``) as of each query: float32 ``(n, 2)``.

    The count is the user's interactions strictly before ``as_of`` in ``timeline`` plus
    ``later_events`` (interactions the model learnt of after training, e.g. from Feature Store; they
    carry no rating, so the mean is over the timeline's). ``user_idx`` -1: a user the model does
    not know (count from ``later_events`` only, mean NaN).
    """
    user_idx = np.asarray(user_idx, dtype=np.int64)
    count, rating_sum, _ = timeline.before(user_idx, as_of)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = rating_sum / count
    if later_events is not None:
        count = count + np.asarray(later_events, dtype=np.float64)
    return np.column_stack([mean, count]).astype(np.float32)


class PointInTimeFeatures:
    """The user features and the items' time-dependent features of queries at their ``as_of``.

    Training builds its ranker rows with this class over every interaction; serving over the
    artifact's timelines (the same interactions, up to ``data_end``). Item rows arrive with their
    static columns (category, price, year: from Feature Store or the artifact's snapshot); the
    time-dependent columns are always recomputed here at the row's ``as_of``.
    """

    def __init__(
        self,
        users: Timeline,
        items: Timeline,
        data_end: int,
        user_feature_names: Sequence[str],
        item_feature_names: Sequence[str],
    ) -> None:
        self.users = users
        self.items = items
        self.data_end = int(data_end)
        self._user_columns = [(c, USER_FEATURES.index(n)) for c, n in enumerate(user_feature_names) if n in USER_FEATURES]
        self._n_user = len(user_feature_names)
        self._item_columns = [
            (c, ITEM_TIME_FEATURES.index(n)) for c, n in enumerate(item_feature_names) if n in ITEM_TIME_FEATURES
        ]

    def user_rows(
        self, user_idx: np.ndarray, as_of: np.ndarray, later_events: np.ndarray | None = None
    ) -> np.ndarray:
        """float32 (len(user_idx), len(user_feature_names)); see :func:`user_statistics`."""
        out = np.full((len(user_idx), self._n_user), np.nan, dtype=np.float32)
        if self._user_columns and len(user_idx):
            stats = user_statistics(self.users, user_idx, as_of, later_events)
            for column, stat in self._user_columns:
                out[:, column] = stats[:, stat]
        return out

    def item_rows(self, static_rows: np.ndarray, item_idx: np.ndarray, as_of: np.ndarray) -> np.ndarray:
        """``static_rows`` (float32, one per item, the item feature columns) with the time-dependent
        columns set to their values at each row's ``as_of``."""
        out = np.array(static_rows, dtype=np.float32, copy=True)
        if self._item_columns and len(item_idx):
            stats = item_statistics(self.items, item_idx, as_of, self.data_end)
            for column, stat in self._item_columns:
                out[:, column] = stats[:, stat]
        return out
