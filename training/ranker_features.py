"""Point-in-time features of the stage-2 ranker.

Every aggregate of a query row (an entity and a time ``t``) is computed only from history rows with
``timestamp < t``, strictly: a rating given in the same second as the query is as unknown to the
ranker as one given later. Training asks for features at each user's validation time; the shipped
artifact asks for a snapshot at ``max(timestamp) + 1``, so serving sees the same definitions.

No history before ``t`` gives a count of 0 and NaN for the mean and the age (XGBoost treats NaN as
missing). An item absent from the metadata table, or with an unknown category, gets NaN there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from twostage_rec import schema

USER_FEATURES: tuple[str, ...] = (schema.USER_MEAN_RATING, schema.USER_RATING_COUNT)
ITEM_FEATURES: tuple[str, ...] = (
    schema.ITEM_AVG_RATING,
    schema.ITEM_RATING_COUNT,
    schema.ITEM_RECENT_COUNT,
    schema.ITEM_WEEK_COUNT,
    schema.ITEM_TREND,
    schema.ITEM_DAYS_SINCE_FIRST,
    schema.CATEGORY_CODE,
    schema.PRICE,
    schema.YEAR,
)

_SECONDS_PER_DAY = 86_400.0
RECENT_WINDOW_S = 30 * 86_400  # "recent" popularity: what is being watched/bought right now
WEEK_WINDOW_S = 7 * 86_400  # with the 30-day count, whether an item is rising or fading


def ranker_feature_names(sources: Sequence[str], history_features: bool = True) -> tuple[str, ...]:
    """The ranker's features in order: candidate features of the model's sources, then user and
    item features. ``history_features=False`` leaves out the candidate-vs-history ones (an ablation)."""
    per_source = {
        schema.SOURCE_MF: (schema.MF_SCORE, schema.MF_RANK),
        schema.SOURCE_NEIGHBOURS: (schema.NEIGHBOURS_SCORE, schema.NEIGHBOURS_RANK),
        schema.SOURCE_SEQUENCE: (schema.SEQUENCE_SCORE, schema.SEQUENCE_RANK),
    }
    names = [name for source in sources for name in per_source[source]]
    names.append(schema.FUSION_SCORE)
    if history_features:
        names.extend(schema.HISTORY_FEATURES)
    return (*names, *USER_FEATURES, *ITEM_FEATURES)


def category_vocabulary(items: pd.DataFrame) -> list[str]:
    """Sorted unique non-null categories of ``items``; a category's code is its position here."""
    if schema.CATEGORY not in items.columns:
        return []
    return sorted(items[schema.CATEGORY].astype("string").dropna().unique())


def point_in_time_user_features(
    history: pd.DataFrame | Timelines, user_ids: ArrayLike, at_time: ArrayLike
) -> np.ndarray:
    """User features of each query ``(user_ids[q], at_time[q])`` from history strictly before it.

    ``history`` is the interaction table, or its :class:`Timelines` when many calls share it.
    ``at_time`` is an integer array aligned with ``user_ids`` or one integer for all queries.
    Returns float32 ``(n_queries, len(USER_FEATURES))``.
    """
    user_ids = np.asarray(user_ids, dtype=object)
    count, rating_sum, _ = Timelines.of(history).of_column(schema.USER_ID).before(user_ids, at_time)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = rating_sum / count
    return np.column_stack([mean, count]).astype(np.float32)


def point_in_time_item_features(
    history: pd.DataFrame | Timelines,
    items: pd.DataFrame,
    item_ids: ArrayLike,
    at_time: ArrayLike,
    categories: Sequence[str],
) -> np.ndarray:
    """Item features of each query ``(item_ids[q], at_time[q])``: aggregates over every user's
    history strictly before ``at_time[q]``, plus the item's static metadata from ``items`` as is.

    ``categories`` is the vocabulary from :func:`category_vocabulary`, fixed at training time.
    Returns float32 ``(n_queries, len(ITEM_FEATURES))``.
    """
    item_ids = np.asarray(item_ids, dtype=object)
    at_time = _query_times(at_time, len(item_ids))
    timeline = Timelines.of(history).of_column(schema.ITEM_ID)
    codes = timeline.codes(item_ids)  # hashed once for the three windows
    count, rating_sum, first_ts = timeline.before(codes, at_time)
    with np.errstate(invalid="ignore", divide="ignore"):
        avg = rating_sum / count
    count_before_window, _, _ = timeline.before(codes, at_time - RECENT_WINDOW_S)
    recent = count - count_before_window
    count_before_week, _, _ = timeline.before(codes, at_time - WEEK_WINDOW_S)
    week = count - count_before_week
    with np.errstate(invalid="ignore", divide="ignore"):
        # Daily rate over the last week relative to the last 30 days: > 1 rising, < 1 fading.
        trend = np.where(recent > 0, (week / 7.0) / (recent / 30.0), np.nan)
    days_since_first = (at_time - first_ts) / _SECONDS_PER_DAY
    item_index, metadata = _item_metadata(items, categories)
    static = metadata[_positions_in(item_ids, item_index)]  # position -1 is the all-NaN row
    return np.column_stack([avg, count, recent, week, trend, days_since_first, static]).astype(np.float32)


def snapshot_user_features(
    history: pd.DataFrame | Timelines, user_index_ids: Sequence[str], at_time: int
) -> np.ndarray:
    """Features of every user of the index as of ``at_time`` (``max timestamp + 1`` counts all
    history): float32 ``(len(user_index_ids), len(USER_FEATURES))``, row ``user_idx``."""
    return point_in_time_user_features(history, user_index_ids, at_time)


def snapshot_item_features(
    history: pd.DataFrame | Timelines,
    items: pd.DataFrame,
    item_index_ids: Sequence[str],
    at_time: int,
    categories: Sequence[str],
) -> np.ndarray:
    """Features of every item of the index as of ``at_time``: float32
    ``(len(item_index_ids), len(ITEM_FEATURES))``, row ``item_idx``."""
    return point_in_time_item_features(history, items, item_index_ids, at_time, categories)


def _check_history(history: pd.DataFrame) -> None:
    missing = [c for c in schema.INTERACTION_COLUMNS if c not in history.columns]
    if missing:
        raise ValueError(f"history is missing column(s) {missing}; has {list(history.columns)}")
    if not pd.api.types.is_integer_dtype(history[schema.TIMESTAMP]):
        raise ValueError(
            f"history column '{schema.TIMESTAMP}' must hold integer seconds, "
            f"got dtype {history[schema.TIMESTAMP].dtype}"
        )
    bad = history[schema.RATING].isna().to_numpy()
    if bad.any():
        raise ValueError(
            f"history column '{schema.RATING}' is empty at row {history.index[bad.argmax()]}"
        )


def _query_times(at_time: ArrayLike, n_queries: int) -> np.ndarray:
    at_time = np.asarray(at_time)
    if not np.issubdtype(at_time.dtype, np.integer):
        raise ValueError(f"at_time must hold integer seconds, got dtype {at_time.dtype}")
    if at_time.ndim == 0:
        return np.full(n_queries, at_time, dtype=np.int64)
    if at_time.shape != (n_queries,):
        raise ValueError(f"at_time has shape {at_time.shape}, expected ({n_queries},)")
    return at_time.astype(np.int64, copy=False)


def _entity_codes(column: pd.Series) -> tuple[np.ndarray, np.ndarray | pd.Index]:
    """Each row's entity code and the entities, by code. A categorical column (the loaders' ids)
    is coded already: at 10M rows, hashing the strings again was 4.2 of the 7.6 CPU seconds of
    the user and item timelines. Categories no row uses are entities without rows, as absent
    ones are."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.cat.codes.to_numpy(), column.cat.categories
    return pd.factorize(column.to_numpy())


def _positions_in(query_ids: np.ndarray, index: pd.Index) -> np.ndarray:
    """Position of each query id in ``index``, -1 when absent; hashes each distinct id once."""
    codes, uniques = pd.factorize(query_ids)
    positions = index.get_indexer(uniques)
    return np.where(codes >= 0, positions[codes], -1)


class Timelines:
    """An interaction table checked once, with a :class:`Timeline` per entity column built on
    first use: the sort and the cumulative sums are paid once per run, not once per call."""

    def __init__(self, history: pd.DataFrame) -> None:
        _check_history(history)
        self.history = history
        self._columns: dict[str, Timeline] = {}

    @classmethod
    def of(cls, history: pd.DataFrame | Timelines) -> Timelines:
        return history if isinstance(history, Timelines) else cls(history)

    def of_column(self, entity_column: str) -> Timeline:
        if entity_column not in self._columns:
            self._columns[entity_column] = Timeline(self.history, entity_column)
        return self._columns[entity_column]


class Timeline:
    """One entity column's history sorted by the key ``entity * span + (timestamp - t_min)``: the
    rows of an entity strictly before ``t`` are one contiguous run that starts at the entity's first
    row and ends where ``searchsorted`` puts the query's own key."""

    def __init__(self, history: pd.DataFrame, entity_column: str) -> None:
        entity_codes, entity_uniques = _entity_codes(history[entity_column])
        self.uniques = pd.Index(entity_uniques)
        timestamps = history[schema.TIMESTAMP].to_numpy(dtype=np.int64)
        self.t_min = int(timestamps.min()) if len(timestamps) else 0
        # offsets 0..span-1; span-1 means "after all history"
        self.span = int(timestamps.max()) - self.t_min + 2 if len(timestamps) else 2
        if len(entity_uniques) * self.span >= 2**62:
            raise ValueError(
                f"history '{schema.TIMESTAMP}' spans {self.span} units over {len(entity_uniques)} "
                f"{entity_column}s, too wide for one int64 key: timestamps must be in seconds"
            )
        key = entity_codes.astype(np.int64) * self.span + (timestamps - self.t_min)
        order = np.argsort(key, kind="stable")
        self.key = key[order]
        self.entity_start = np.searchsorted(self.key, np.arange(len(entity_uniques), dtype=np.int64) * self.span)
        self.timestamps = timestamps[order]
        # Cumulative sums restart per entity, so a row of another entity can never shift the float
        # rounding of this entity's sums (the no-leakage test compares exactly).
        ratings = history[schema.RATING].to_numpy(dtype=np.float64)[order]
        self.cumulative = pd.Series(ratings).groupby(entity_codes[order]).cumsum().to_numpy()

    def codes(self, query_ids: np.ndarray) -> np.ndarray:
        """Each query id's entity code, -1 for an entity without history."""
        return _positions_in(query_ids, self.uniques).astype(np.int64)

    def before(self, query: np.ndarray, at_time: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query: count, rating sum and first timestamp of the entity's rows with ts < at_time.

        ``query`` holds entity ids (object) or codes from :meth:`codes` (integers).
        """
        query_codes = query if np.issubdtype(np.asarray(query).dtype, np.integer) else self.codes(query)
        at_time = _query_times(at_time, len(query_codes))
        if not len(self.key):
            n = len(query_codes)
            return np.zeros(n), np.full(n, np.nan), np.full(n, np.nan)
        known = query_codes >= 0
        # Clipping keeps the meaning: before t_min nothing precedes t, after t_max everything does.
        offset = np.clip(at_time - self.t_min, 0, self.span - 1)
        start = self.entity_start[np.where(known, query_codes, 0)]
        end = np.searchsorted(self.key, query_codes * self.span + offset, side="left")
        count = np.where(known, end - start, 0)
        has_rows = count > 0
        last = np.where(has_rows, end - 1, 0)
        first = np.where(has_rows, start, 0)
        rating_sum = np.where(has_rows, self.cumulative[last], np.nan)
        first_ts = np.where(has_rows, self.timestamps[first], np.nan)
        return count.astype(np.float64), rating_sum, first_ts


def _item_metadata(items: pd.DataFrame, categories: Sequence[str]) -> tuple[pd.Index, np.ndarray]:
    """Index of item ids and their (category code, price, year) rows, NaN where unknown, plus a
    last all-NaN row for items absent from the table."""
    if schema.ITEM_ID not in items.columns:
        raise ValueError(f"items is missing column '{schema.ITEM_ID}'; has {list(items.columns)}")
    index = pd.Index(items[schema.ITEM_ID].to_numpy())
    if not index.is_unique:
        duplicate = index[index.duplicated()][0]
        raise ValueError(f"items column '{schema.ITEM_ID}' repeats id {duplicate!r}")
    metadata = np.full((len(items) + 1, 3), np.nan)
    if schema.CATEGORY in items.columns:
        codes = pd.Index(list(categories), dtype="string").get_indexer(
            items[schema.CATEGORY].astype("string")
        )
        metadata[:-1, 0] = np.where(codes >= 0, codes, np.nan)
    for col, name in ((1, schema.PRICE), (2, schema.YEAR)):
        if name in items.columns:
            try:
                metadata[:-1, col] = items[name].to_numpy(dtype=np.float64, na_value=np.nan)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"items column '{name}' must be numeric: {exc}") from None
    return index, metadata
