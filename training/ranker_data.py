"""Stage 2's training and evaluation rows, made by the serving code itself.

For a held-out period, stage 1 runs exactly as serving runs it (the serving package's sources,
merger and :class:`~twostage_rec.candidate_features.CandidateFeatureBuilder`), over each user's
history before the held-out item. User and item features are point-in-time, by serving's own
:class:`~twostage_rec.timelines.PointInTimeFeatures` at the query's time. A candidate's label is 1
if it is the held-out item, else 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.evaluation import Period, SourceRun
from twostage_rec.candidate_features import CandidateFeatureBuilder
from twostage_rec.sources.merge import CandidateMerger, MergedCandidates
from twostage_rec.timelines import PointInTimeFeatures


@dataclass(frozen=True)
class CandidateRows:
    """One row per candidate, the queries' candidates one after the other."""

    x: np.ndarray  # float32 (n_rows, n_features)
    label: np.ndarray  # float32: 1 for the held-out item
    rating: np.ndarray  # float32: the held-out item's rating on its row, 0 elsewhere (the rating model's target)
    query: np.ndarray  # int64: the row's query (position in the period)
    merged: list[MergedCandidates]


@dataclass(frozen=True)
class FeatureHistory:
    """What point-in-time features are computed from: every interaction (as timelines) and each
    item's static metadata (``ITEM_FEATURES`` rows by item_idx, the time columns NaN)."""

    point_in_time: PointInTimeFeatures
    static_items: np.ndarray  # float32 (n_items, len(ITEM_FEATURES))

    def item_rows(self, item_idx: np.ndarray, as_of: np.ndarray) -> np.ndarray:
        return self.point_in_time.item_rows(self.static_items[item_idx], item_idx, as_of)


def candidate_rows(
    period: Period,
    run: SourceRun,
    merger: CandidateMerger,
    builder: CandidateFeatureBuilder,
    history: FeatureHistory,
    without: str | None = None,
) -> CandidateRows:
    """The merged candidates of every query of ``period`` (from the sources' ``run``) and their
    ranker features; ``without`` leaves one source out (an ablation)."""
    merged = run.merged(merger, without)
    lengths = np.array([len(c.item_idx) for c in merged], dtype=np.int64)
    query = np.repeat(np.arange(len(merged)), lengths)
    candidates = np.concatenate([c.item_idx for c in merged]) if merged else np.empty(0, np.int64)
    item_rows = history.item_rows(candidates, period.at_time[query])
    user_rows = history.point_in_time.user_rows(period.user_idx, period.at_time)
    x = _feature_matrix(builder, run, merged, period.at_time, user_rows, item_rows, lengths)
    label = (candidates == period.target[query]).astype(np.float32)
    rating = period.rating[query] if period.rating is not None else np.ones(len(query), dtype=np.float32)
    return CandidateRows(x, label, np.where(label > 0, rating, 0.0).astype(np.float32), query, merged)


# Queries per feature build: as many as a large serving batch. One build over a whole period
# (12,080 ML-1M queries x 3,706 items) has more (query, item) keys than the neighbour sums' dense
# limit, so they went through a sort of every gathered entry (~24M); in chunks each build sums
# densely, with the same values (every query's features are its own).
FEATURE_CHUNK = 256


def _feature_matrix(
    builder: CandidateFeatureBuilder,
    run: SourceRun,
    merged: list[MergedCandidates],
    at_time: np.ndarray,
    user_rows: np.ndarray,
    item_rows: np.ndarray,
    lengths: np.ndarray,
) -> np.ndarray:
    """``builder.matrix`` over every query of ``run``, ``FEATURE_CHUNK`` queries at a time."""
    if not merged:
        return builder.matrix(run.queries, merged, at_time, user_rows, item_rows)
    row_start = np.concatenate([[0], np.cumsum(lengths)])
    parts = []
    for a in range(0, len(merged), FEATURE_CHUNK):
        b = min(a + FEATURE_CHUNK, len(merged))
        rows = slice(int(row_start[a]), int(row_start[b]))
        parts.append(builder.matrix(run.queries[a:b], merged[a:b], at_time[a:b], user_rows[a:b], item_rows[rows]))
    return np.vstack(parts)
