"""The two-stage recommender: history, candidate sources, merge, features, ranking, in one call.

Also the Python API of the original design: :class:`TwoStageRecommender` and
:func:`get_recommendations`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from twostage_rec import schema
from twostage_rec.artifact import ModelArtifact, load_artifact
from twostage_rec.circuit_breaker import CircuitBreaker
from twostage_rec.errors import RecommenderError, UserNotFound
from twostage_rec.features import FeatureSource, RuntimeResources, make_feature_source
from twostage_rec.history import UserHistory, merge_histories
from twostage_rec.history_store import HistoryBatch, make_history_source
from twostage_rec.ranking import Ranker, XGBoostRanker
from twostage_rec.request import RecommendationRequest
from twostage_rec.retrieval import ItemFilter
from twostage_rec.settings import Settings
from twostage_rec.sources import Query, SourceResult
from twostage_rec.sources.assembly import make_feature_builder, make_merger, make_point_in_time, make_sources, plain
from twostage_rec.sources.merge import MergedCandidates, PopularItems

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
    as_of: int = 0  # the moment the answer is for (epoch seconds)


class FreshHistorySource(Protocol):
    """Where interactions recorded after training live (the user-history Feature Store group)."""

    def get(self, user_ids: Sequence[str], deadline: float) -> HistoryBatch: ...


@dataclass(frozen=True)
class _Histories:
    histories: list[UserHistory]
    ignored: list[int]  # recent_items unknown to the model or after as_of, per request
    later: list[int]  # interactions in each history at or after the artifact's data_end
    degraded: bool


@dataclass(frozen=True)
class _RankerInputs:
    """Everything a batch has before the ranker runs."""

    as_of: np.ndarray  # int64 per request
    histories: _Histories
    personal: list[int]  # requests answered by the model (the others: popular or an error)
    merged: list[MergedCandidates]  # per personal request
    popular: dict[int, np.ndarray]  # request -> the popularity fallback's items
    errors: dict[int, RecommenderError]
    item_rows: np.ndarray  # the merged candidates', then the fallbacks' item features
    x: np.ndarray  # the ranker's input, the merged candidates' rows
    degraded: bool
    stage_ends: tuple[float, float, float]  # perf_counter at the end of history, retrieval, features


def _until(history: UserHistory, as_of: int) -> UserHistory:
    """The interactions at or before ``as_of``: a backtest must not see the future."""
    keep = history.timestamps <= as_of
    return history if keep.all() else UserHistory(history.item_idx[keep], history.timestamps[keep])


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``feature_store``: the process's Feature Store client and pool, shared by the item and
        history readers this builds (from the settings by default). ``clock``: the server clock,
        the ``as_of`` of a request that gives none."""
        self.artifact = artifact
        self.settings = settings or Settings()
        self._feature_store = feature_store or RuntimeResources(self.settings)
        self._clock = clock
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
        self._point_in_time = make_point_in_time(artifact)
        self._ranker = ranker or XGBoostRanker(artifact)
        self._fresh = fresh_history or make_history_source(m, self.settings, self._feature_store)
        # Only a reader built here uses self._feature_store; injected ones bring their own.
        self._reads_feature_store = (feature_source is None and self.settings.feature_source != "embedded") or (
            fresh_history is None and self._fresh is not None
        )
        names = m.item_feature_names
        self._avg_rating_col = names.index(schema.ITEM_AVG_RATING) if schema.ITEM_AVG_RATING in names else None
        self._count_col = names.index(schema.ITEM_RATING_COUNT) if schema.ITEM_RATING_COUNT in names else None
        # Plain views of the shared memory maps (see sources.assembly.plain): every interaction of
        # each user in time order is what they have seen and, up to a request's as_of, their history.
        self._seen = (plain(artifact.seen_indptr), plain(artifact.seen_indices), plain(artifact.seen_timestamps))

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
        """Answer several users with one pass of each stage: one feature fetch, one XGBoost call.

        A request that cannot be answered (an unknown user asked to raise) fails the whole call.
        """
        answers = self.answer_many(requests)
        for answer in answers:
            if isinstance(answer, RecommenderError):
                raise answer
        return answers  # type: ignore[return-value]

    def answer_many(self, requests: Sequence[RecommendationRequest]) -> list[Recommendation | RecommenderError]:
        """:meth:`recommend_many`, with each request's own error in its place instead of raising
        (a JSON Lines job answers every line it can). A failure of the whole call still raises."""
        started = time.perf_counter()
        inputs = self._ranker_inputs(requests)
        t_history, t_retrieval, t_features = inputs.stage_ends
        personal, merged, x, item_rows = inputs.personal, inputs.merged, inputs.x, inputs.item_rows
        # Stage 2: one ranker call over every personal query's candidates, then one rating-model
        # call for the rows that are shown (or sorted by their rating).
        scores = self._ranker.score(x)
        shown = self._shown_rows(merged, scores, [requests[p] for p in personal])
        ratings = np.full(len(scores), np.nan, dtype=np.float32)
        ratings[shown] = self._ranker.predicted_rating(x[shown])
        t_ranking = time.perf_counter()
        popular, errors, known, as_of = inputs.popular, inputs.errors, inputs.histories, inputs.as_of

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
        degraded = inputs.degraded
        return [
            errors[p]
            if p in errors
            else Recommendation(
                r.user_id, answers[p][0], answers[p][1], degraded, dict(timings), known.ignored[p], int(as_of[p])
            )
            for p, r in enumerate(requests)
        ]

    def ranker_inputs(self, requests: Sequence[RecommendationRequest]) -> tuple[list[MergedCandidates], np.ndarray]:
        """The merged candidates of the requests that get personal answers and the ranker's input
        matrix (their candidates one after the other): what training's rows must equal for the
        same moment (the parity check, ``training/serving_evaluation.py``)."""
        inputs = self._ranker_inputs(requests)
        return inputs.merged, inputs.x

    def source_results(self, requests: Sequence[RecommendationRequest]) -> dict[str, list[SourceResult]]:
        """Each candidate source's own answer to each request (its best ``num_candidates`` unseen
        items at the request's ``as_of``): how a source alone would serve, for the report's baselines."""
        _, _, _, queries = self._queries(requests)
        return {s.name: s.run(queries) for s in self._sources}

    def _queries(
        self, requests: Sequence[RecommendationRequest]
    ) -> tuple[np.ndarray, float, _Histories, list[Query]]:
        """(as_of, the Feature Store deadline, the histories, stage 1's queries) of the requests."""
        if self._reads_feature_store:
            self._feature_store.prepare()  # a new worker's client is built before the budget starts
        now = int(self._clock())
        as_of = np.array([now if r.as_of is None else r.as_of for r in requests], dtype=np.int64)
        deadline = time.monotonic() + self.settings.feature_store_deadline_ms / 1000.0
        known = self._histories(requests, as_of, deadline)
        queries = [self._query(r, h, t) for r, h, t in zip(requests, known.histories, as_of.tolist())]
        return as_of, deadline, known, queries

    def _ranker_inputs(self, requests: Sequence[RecommendationRequest]) -> _RankerInputs:
        """History, stage 1, item features and the ranker's matrix: everything before the ranker."""
        as_of, deadline, known, queries = self._queries(requests)
        personal = [p for p, q in enumerate(queries) if q.user_idx >= 0 or len(q.history)]
        personal_set = set(personal)
        errors: dict[int, RecommenderError] = {}
        cold = []
        for p in range(len(requests)):
            if p in personal_set:
                continue
            if (requests[p].on_unknown_user or self.settings.unknown_user) == "error":
                errors[p] = UserNotFound(f"user_id {requests[p].user_id!r} is not in the model")
            else:
                cold.append(p)
        t_history = time.perf_counter()

        # Stage 1: every source over the personal queries, merged into one list per query.
        asked = [queries[p] for p in personal]
        merged = self._merger.merge(asked, {s.name: s.run(asked) for s in self._sources})
        popular = {p: self._popular.top(requests[p].top_k, queries[p].blocked, queries[p].allowed) for p in cold}
        t_retrieval = time.perf_counter()

        # Item features: one fetch for the deduplicated candidates of every request; the
        # time-dependent columns at each row's as_of.
        lists = [m.item_idx for m in merged] + list(popular.values())
        all_idx = np.concatenate(lists) if lists else np.empty(0, dtype=np.int64)
        row_as_of = np.repeat(as_of[personal + list(popular)], [len(x) for x in lists]) if lists else as_of[:0]
        unique_idx, inverse = np.unique(all_idx, return_inverse=True)
        batch = self._features.get(unique_idx, deadline)
        item_rows = self._point_in_time.item_rows(batch.values[inverse], all_idx, row_as_of)
        t_features = time.perf_counter()

        at_time = as_of[personal]
        user_rows = self._point_in_time.user_rows(
            np.array([q.user_idx for q in asked], dtype=np.int64), at_time, np.array([known.later[p] for p in personal])
        )
        n_ranked = sum(len(m.item_idx) for m in merged)
        x = self._builder.matrix(asked, merged, at_time, user_rows, item_rows[:n_ranked])
        return _RankerInputs(
            as_of, known, personal, merged, popular, errors, item_rows, x,
            batch.degraded or known.degraded, (t_history, t_retrieval, t_features),
        )

    def _histories(self, requests: Sequence[RecommendationRequest], as_of: np.ndarray, deadline: float) -> _Histories:
        """Each request's history up to its ``as_of``: the artifact's, then Feature Store's fresh
        events, then ``recent_items`` (whose timestamp defaults to ``as_of``)."""
        fresh = self._fresh.get([r.user_id for r in requests], deadline) if self._fresh else HistoryBatch({})
        histories, ignored, later = [], [], []
        length = self.artifact.manifest.history_length
        data_end = self.artifact.manifest.data_end
        for r, moment in zip(requests, as_of.tolist()):
            parts = [self._stored_history(self._users.position(r.user_id), moment)]
            events = fresh.events.get(r.user_id)
            if events:
                # Items this model does not know (newer than its catalog) cannot be scored: skipped.
                parts.append(self._known_items([e.item_id for e in events], [e.timestamp for e in events])[0])
            recent, unknown = self._known_items(
                [i.item_id for i in r.recent_items],
                [moment if i.timestamp is None else i.timestamp for i in r.recent_items],
            )
            after = int((recent.timestamps > moment).sum())
            history = merge_histories([*(_until(p, moment) for p in parts), _until(recent, moment)], length)
            histories.append(history)
            ignored.append(unknown + after)
            # What the artifact cannot count (it ends at data_end) adds to the user's count.
            later.append(int((history.timestamps >= data_end).sum()))
        return _Histories(histories, ignored, later, fresh.degraded)

    def _stored_history(self, user_idx: int, as_of: int) -> UserHistory:
        """The user's last ``history_length`` interactions in the artifact at or before ``as_of``."""
        if user_idx < 0:
            return UserHistory.empty()
        indptr, items, times = self._seen
        start = int(indptr[user_idx])
        end = self._seen_until(user_idx, as_of)
        start = max(start, end - self.artifact.manifest.history_length)
        return UserHistory(items[start:end].astype(np.int64), times[start:end])

    def _seen_until(self, user_idx: int, as_of: int) -> int:
        """The end of the user's artifact interactions at or before ``as_of`` (their row is in time order)."""
        indptr, _, times = self._seen
        start, end = int(indptr[user_idx]), int(indptr[user_idx + 1])
        return start + int(np.searchsorted(times[start:end], as_of, side="right"))

    def _known_items(self, item_ids: Sequence[str], timestamps: Sequence[int]) -> tuple[UserHistory, int]:
        """The items the model knows, in the given order (sorted by time later), and how many it did not."""
        positions = self._items.positions(item_ids)
        known = positions >= 0
        history = UserHistory(positions[known], np.asarray(timestamps, dtype=np.int64)[known])
        return history, int(len(item_ids) - known.sum())

    def _query(self, request: RecommendationRequest, history: UserHistory, as_of: int) -> Query:
        user_idx = self._users.position(request.user_id)
        parts = [history.item_idx, self._exclusions(request)]
        if user_idx >= 0:
            indptr, indices, _ = self._seen
            parts.append(indices[indptr[user_idx] : self._seen_until(user_idx, as_of)])
        blocked = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
        return Query(user_idx, history, blocked, self._filter.allowed(request.filters), request.num_candidates)

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
