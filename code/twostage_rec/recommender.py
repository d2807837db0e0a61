"""The two-stage recommender: history, candidate sources, merge, features, ranking, in one call.

Also the Python API of the original design: :class:`TwoStageRecommender` and
:func:`get_recommendations`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from twostage_rec import schema
from twostage_rec.artifact import ModelArtifact, load_artifact
from twostage_rec.circuit_breaker import CircuitBreaker
from twostage_rec.errors import UserNotFound
from twostage_rec.features import FeatureSource, RuntimeResources, make_feature_source
from twostage_rec.history import UserHistory, merge_histories
from twostage_rec.history_store import HistoryBatch, make_history_source
from twostage_rec.ranking import Ranker, XGBoostRanker
from twostage_rec.request import RecommendationRequest
from twostage_rec.retrieval import ItemFilter
from twostage_rec.settings import Settings
from twostage_rec.sources import Query
from twostage_rec.sources.assembly import make_feature_builder, make_merger, make_sources, plain
from twostage_rec.sources.merge import PopularItems

FALLBACK_POPULAR = "popular"


@dataclass
class Recommendation:
    """The answer for one user."""

    user_id: str
    items: list[dict[str, Any]]
    fallback: str | None = None
    degraded: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
    ignored_recent_items: int = 0


class FreshHistorySource(Protocol):
    """Where interactions recorded after training live (the user-history Feature Store group)."""

    def get(self, user_ids: Sequence[str], deadline: float) -> HistoryBatch: ...


@dataclass(frozen=True)
class _Histories:
    histories: list[UserHistory]
    ignored: list[int]  # recent_items ids unknown to the model, per request
    degraded: bool


class TwoStageRecommender:
    """Candidate sources over the user's history, merged; item features; XGBoost ranking."""

    def __init__(
        self,
        artifact: ModelArtifact,
        settings: Settings | None = None,
        feature_source: FeatureSource | None = None,
        ranker: Ranker | None = None,
        fresh_history: FreshHistorySource | None = None,
        feature_store: RuntimeResources | None = None,
    ) -> None:
        """``feature_store``: the process's Feature Store client and pool, shared by the item and
        history readers this builds (from the settings by default)."""
        self.artifact = artifact
        self.settings = settings or Settings()
        self._feature_store = feature_store or RuntimeResources(self.settings)
        m = artifact.manifest
        self.model_version = m.model_version
        self.item_id_field = m.item_id_field
        # Lookups through the artifact's memory-mapped id tables: no per-id object in the worker.
        self._users = artifact.user_ids
        self._items = artifact.item_ids
        self._filter = ItemFilter(artifact)
        self._sources = make_sources(artifact, self.settings)
        self._merger = make_merger(artifact)
        self._popular = PopularItems(artifact.popular_items)
        self._features = feature_source or make_feature_source(artifact, self.settings, self._feature_store)
        self._builder = make_feature_builder(artifact)
        self._ranker = ranker or XGBoostRanker(artifact)
        self._fresh = fresh_history or make_history_source(m, self.settings, self._feature_store)
        # Only a reader built here uses self._feature_store; injected ones bring their own.
        self._reads_feature_store = (feature_source is None and self.settings.feature_source != "embedded") or (
            fresh_history is None and self._fresh is not None
        )
        names = m.item_feature_names
        self._avg_rating_col = names.index(schema.ITEM_AVG_RATING) if schema.ITEM_AVG_RATING in names else None
        self._count_col = names.index(schema.ITEM_RATING_COUNT) if schema.ITEM_RATING_COUNT in names else None
        self._no_user_row = np.full(len(m.user_feature_names), np.nan, dtype=np.float32)
        # Plain views of the shared memory maps (see sources.assembly.plain).
        self._history = (
            plain(artifact.history_indptr),
            plain(artifact.history_items),
            plain(artifact.history_timestamps),
        )
        self._seen = (plain(artifact.seen_indptr), plain(artifact.seen_indices))
        self._user_features = plain(artifact.user_features)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, settings: Settings | None = None) -> TwoStageRecommender:
        """The model in ``model_dir``, its values checked (not its checksums: ``serve`` does that)."""
        return cls(load_artifact(Path(model_dir), verify_checksums=False, check_values=True), settings)

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self._sources]

    @property
    def breakers(self) -> list[CircuitBreaker]:
        """The circuit breakers of the Feature Store groups read by the readers built here (none when
        everything comes from the artifact; injected readers bring their own)."""
        return self._feature_store.breakers

    def recommend(self, request: RecommendationRequest) -> Recommendation:
        return self.recommend_many([request])[0]

    def recommend_many(self, requests: Sequence[RecommendationRequest]) -> list[Recommendation]:
        """Answer several users with one pass of each stage: one feature fetch, one XGBoost call."""
        if self._reads_feature_store:
            self._feature_store.prepare()  # a new worker's client is built before the budget starts
        started = time.perf_counter()
        now = int(time.time())
        deadline = time.monotonic() + self.settings.feature_store_deadline_ms / 1000.0
        known = self._histories(requests, now, deadline)
        queries = [self._query(r, h) for r, h in zip(requests, known.histories)]
        personal = [p for p, q in enumerate(queries) if q.user_idx >= 0 or len(q.history)]
        cold = [p for p in range(len(requests)) if p not in set(personal)]
        for p in cold:
            if (requests[p].on_unknown_user or self.settings.unknown_user) == "error":
                raise UserNotFound(f"user_id {requests[p].user_id!r} is not in the model")
        t_history = time.perf_counter()

        # Stage 1: every source over the personal queries, merged into one list per query.
        asked = [queries[p] for p in personal]
        merged = self._merger.merge(asked, {s.name: s.run(asked) for s in self._sources})
        popular = {p: self._popular.top(requests[p].top_k, queries[p].blocked, queries[p].allowed) for p in cold}
        t_retrieval = time.perf_counter()

        # Item features: one fetch for the deduplicated candidates of every request.
        lists = [m.item_idx for m in merged] + list(popular.values())
        all_idx = np.concatenate(lists) if lists else np.empty(0, dtype=np.int64)
        unique_idx, inverse = np.unique(all_idx, return_inverse=True)
        batch = self._features.get(unique_idx, deadline)
        item_rows = batch.values[inverse]
        t_features = time.perf_counter()

        # Stage 2: one ranker call over every personal query's candidates, then one rating-model
        # call for the rows that are shown (or sorted by their rating).
        user_rows = np.stack([self._user_row(q) for q in asked]) if asked else np.empty((0, len(self._no_user_row)))
        at_time = [max(now, q.history.last_timestamp or now) for q in asked]
        n_ranked = sum(len(m.item_idx) for m in merged)
        x = self._builder.matrix(asked, merged, at_time, user_rows, item_rows[:n_ranked])
        scores = self._ranker.score(x)
        shown = self._shown_rows(merged, scores, [requests[p] for p in personal])
        ratings = np.full(len(scores), np.nan, dtype=np.float32)
        ratings[shown] = self._ranker.predicted_rating(x[shown])
        t_ranking = time.perf_counter()

        timings = {
            "history": _ms(started, t_history),
            "retrieval": _ms(t_history, t_retrieval),
            "features": _ms(t_retrieval, t_features),
            "ranking": _ms(t_features, t_ranking),
            "total": _ms(started, t_ranking),
        }
        answers: dict[int, tuple[list[dict[str, Any]], str | None]] = {}
        start = 0
        for p, m in zip(personal, merged):
            end = start + len(m.item_idx)
            r = requests[p]
            answers[p] = (
                self._ranked_items(m.item_idx, scores[start:end], ratings[start:end], r.top_k, r.sort_by),
                None,
            )
            start = end
        for p, items in popular.items():
            answers[p] = (self._popular_items(items, item_rows[start : start + len(items)]), FALLBACK_POPULAR)
            start += len(items)
        degraded = batch.degraded or known.degraded
        return [
            Recommendation(r.user_id, answers[p][0], answers[p][1], degraded, dict(timings), known.ignored[p])
            for p, r in enumerate(requests)
        ]

    def _histories(self, requests: Sequence[RecommendationRequest], now: int, deadline: float) -> _Histories:
        """Each request's history: the artifact's, then Feature Store's fresh events, then ``recent_items``."""
        fresh = self._fresh.get([r.user_id for r in requests], deadline) if self._fresh else HistoryBatch({})
        histories, ignored = [], []
        length = self.artifact.manifest.history_length
        for r in requests:
            parts = [self._stored_history(self._users.position(r.user_id))]
            events = fresh.events.get(r.user_id)
            if events:
                # Items this model does not know (newer than its catalog) cannot be scored: skipped.
                parts.append(self._known_items([e.item_id for e in events], [e.timestamp for e in events])[0])
            recent, unknown = self._known_items(
                [i.item_id for i in r.recent_items],
                [now if i.timestamp is None else i.timestamp for i in r.recent_items],
            )
            histories.append(merge_histories([*parts, recent], length))
            ignored.append(unknown)
        return _Histories(histories, ignored, fresh.degraded)

    def _stored_history(self, user_idx: int) -> UserHistory:
        if user_idx < 0:
            return UserHistory.empty()
        indptr, items, times = self._history
        a, b = indptr[user_idx], indptr[user_idx + 1]
        return UserHistory(items[a:b].astype(np.int64), times[a:b])

    def _known_items(self, item_ids: Sequence[str], timestamps: Sequence[int]) -> tuple[UserHistory, int]:
        """The items the model knows, in the given order (sorted by time later), and how many it did not."""
        positions = self._items.positions(item_ids)
        known = positions >= 0
        history = UserHistory(positions[known], np.asarray(timestamps, dtype=np.int64)[known])
        return history, int(len(item_ids) - known.sum())

    def _query(self, request: RecommendationRequest, history: UserHistory) -> Query:
        user_idx = self._users.position(request.user_id)
        parts = [history.item_idx, self._exclusions(request)]
        if user_idx >= 0:
            indptr, indices = self._seen
            parts.append(indices[indptr[user_idx] : indptr[user_idx + 1]])
        blocked = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
        return Query(user_idx, history, blocked, self._filter.allowed(request.filters), request.num_candidates)

    def _user_row(self, query: Query) -> np.ndarray:
        if query.user_idx < 0:
            return self._no_user_row
        return self._user_features[query.user_idx]

    @staticmethod
    def _shown_rows(merged: Sequence[Any], scores: np.ndarray, requests: Sequence[RecommendationRequest]) -> np.ndarray:
        """Rows whose predicted rating is needed: each request's top_k by score, or all its rows
        when it sorts by predicted rating."""
        rows, start = [], 0
        for m, r in zip(merged, requests):
            end = start + len(m.item_idx)
            if r.sort_by == "predicted_rating":
                rows.append(np.arange(start, end))
            else:
                rows.append(start + np.argsort(-scores[start:end], kind="stable")[: r.top_k])
            start = end
        return np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)

    def _ranked_items(
        self, item_idx: np.ndarray, scores: np.ndarray, ratings: np.ndarray, top_k: int, sort_by: str
    ) -> list[dict[str, Any]]:
        # Stable sorts: equal keys keep the stage-1 (fusion) order.
        if sort_by == "predicted_rating":
            order = np.lexsort((-scores, -ratings))[:top_k]
        else:
            order = np.argsort(-scores, kind="stable")[:top_k]
        return [
            {
                self.item_id_field: self._items[int(item_idx[o])],
                "predicted_rating": round(float(ratings[o]), 4),
                "score": float(scores[o]),
                "rank": rank,
            }
            for rank, o in enumerate(order, start=1)
        ]

    def _popular_items(self, item_idx: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        """Cold start: popularity order; the item's average rating is the non-personal estimate."""
        items = []
        for rank, (idx, row) in enumerate(zip(item_idx, rows), start=1):
            avg = _finite(row[self._avg_rating_col]) if self._avg_rating_col is not None else None
            count = _finite(row[self._count_col]) if self._count_col is not None else None
            items.append(
                {
                    self.item_id_field: self._items[int(idx)],
                    "predicted_rating": avg,
                    "score": count,
                    "rank": rank,
                }
            )
        return items

    def _exclusions(self, request: RecommendationRequest) -> np.ndarray:
        idx = self._items.positions(request.exclude_items)
        return idx[idx >= 0]


def get_recommendations(user_id: str, recommender: TwoStageRecommender, top_k: int = 10) -> list[dict[str, Any]]:
    """The original design's API: the top ``top_k`` items, each a dict with the item id field
    and ``predicted_rating``."""
    request = RecommendationRequest(user_id=user_id, top_k=top_k, num_candidates=max(100, top_k))
    return recommender.recommend(request).items


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000.0, 3)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
