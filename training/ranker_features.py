"""Point-in-time features of the stage-2 ranker, as training computes them.

Every statistic is the serving package's (``twostage_rec.timelines``): the same code computes a
feature for a training row, an offline evaluation row and a live request at the same ``as_of``.
This module adds what only training needs: the interaction table and the items' metadata turned into
timelines and static rows, and a DataFrame-in API for tests and notebooks.

Every aggregate of a query row (an entity and a time ``t``) is computed only from history rows with
``timestamp < t``, strictly: a rating given in the same second as the query is as unknown to the
ranker as one given later. No history before ``t`` gives a count of 0 and NaN for the mean and the
age (XGBoost treats NaN as missing). An item absent from the metadata table, or with an unknown
category, gets NaN there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from twostage_rec import schema
from twostage_rec.timelines import (
    ITEM_TIME_FEATURES,
    RECENT_WINDOW_S,
    USER_FEATURES,
    WEEK_WINDOW_S,
    PointInTimeFeatures,
    Timeline,
    item_statistics,
    user_statistics,
)

ITEM_STATIC_FEATURES: tuple[str, ...] = (schema.CATEGORY_CODE, schema.PRICE, schema.YEAR)
ITEM_FEATURES: tuple[str, ...] = (*ITEM_TIME_FEATURES, *ITEM_STATIC_FEATURES)
# A timeline with no end: the DataFrame API answers any moment from the history it is given.
NO_END = np.iinfo(np.int64).max // 2

__all__ = [
    "ITEM_FEATURES", "ITEM_STATIC_FEATURES", "ITEM_TIME_FEATURES", "RECENT_WINDOW_S", "USER_FEATURES", "WEEK_WINDOW_S",
    "PointInTimeFeatures", "Timelines", "category_vocabulary", "item_static_rows", "point_in_time_item_features",
    "point_in_time_user_features", "ranker_feature_names",
]


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
    timeline = Timelines.of(history).of_column(schema.USER_ID)
    return user_statistics(timeline.timeline, timeline.codes(user_ids), _query_times(at_time, len(user_ids)))


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
    stats = item_statistics(timeline.timeline, timeline.codes(item_ids), at_time, NO_END)
    item_index, metadata = _item_metadata(items, categories)
    static = metadata[_positions_in(item_ids, item_index)]  # position -1 is the all-NaN row
    return np.column_stack([stats, static]).astype(np.float32)


def item_static_rows(items: pd.DataFrame, item_index_ids: Sequence[str], categories: Sequence[str]) -> np.ndarray:
    """Every item of the index as an ``ITEM_FEATURES`` row (row ``item_idx``) with its static
    metadata filled in and the time-dependent columns NaN (:class:`PointInTimeFeatures` sets them)."""
    item_index, metadata = _item_metadata(items, categories)
    rows = np.full((len(item_index_ids), len(ITEM_FEATURES)), np.nan, dtype=np.float32)
    rows[:, len(ITEM_TIME_FEATURES) :] = metadata[_positions_in(np.asarray(item_index_ids, dtype=object), item_index)]
    return rows


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
    """An interaction table checked once, with an :class:`EntityTimeline` per entity column built
    on first use: the sort and the running sums are paid once per run, not once per call."""

    def __init__(self, history: pd.DataFrame) -> None:
        _check_history(history)
        self.history = history
        self._columns: dict[str, EntityTimeline] = {}

    @classmethod
    def of(cls, history: pd.DataFrame | Timelines) -> Timelines:
        return history if isinstance(history, Timelines) else cls(history)

    def of_column(self, entity_column: str) -> EntityTimeline:
        if entity_column not in self._columns:
            self._columns[entity_column] = EntityTimeline(self.history, entity_column)
        return self._columns[entity_column]


class EntityTimeline:
    """One entity column's :class:`~twostage_rec.timelines.Timeline`, by the entities' codes."""

    def __init__(self, history: pd.DataFrame, entity_column: str) -> None:
        entity_codes, entity_uniques = _entity_codes(history[entity_column])
        self.uniques = pd.Index(entity_uniques)
        timestamps = history[schema.TIMESTAMP].to_numpy(dtype=np.int64)
        ratings = history[schema.RATING].to_numpy(dtype=np.float64)
        self.timeline = Timeline.build(entity_codes, timestamps, ratings, len(entity_uniques))

    def codes(self, query_ids: np.ndarray) -> np.ndarray:
        """Each query id's entity code, -1 for an entity without history."""
        return _positions_in(query_ids, self.uniques).astype(np.int64)


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
