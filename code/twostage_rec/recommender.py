"""The two-stage recommender: retrieval, features, ranking, in one call.

Also the Python API of the original design: :class:`TwoStageRecommender` and
:func:`get_recommendations`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twostage_rec import schema
from twostage_rec.artifact import ModelArtifact, load_artifact
from twostage_rec.errors import UserNotFound
from twostage_rec.features import FeatureSource, make_feature_source
from twostage_rec.ranking import Ranker, XGBoostRanker
from twostage_rec.request import RecommendationRequest
from twostage_rec.retrieval import Candidates, ItemFilter, make_retriever
from twostage_rec.settings import Settings

FALLBACK_POPULAR = "popular"


@dataclass
class Recommendation:
    """The answer for one user."""

    user_id: str
    items: list[dict[str, Any]]
    fallback: str | None = None
    degraded: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)


class TwoStageRecommender:
    """MF retrieval of unseen candidates, item features from a feature source, XGBoost ranking."""

    def __init__(
        self,
        artifact: ModelArtifact,
        settings: Settings | None = None,
        feature_source: FeatureSource | None = None,
        ranker: Ranker | None = None,
    ) -> None:
        self.artifact = artifact
        self.settings = settings or Settings()
        m = artifact.manifest
        self.model_version = m.model_version
        self.item_id_field = m.item_id_field
        self._user_index = {u: i for i, u in enumerate(artifact.user_ids)}
        self._item_index = {i: n for n, i in enumerate(artifact.item_ids)}
        self._retriever = make_retriever(artifact, self.settings)
        self._filter = ItemFilter(artifact)
        self._features = feature_source or make_feature_source(artifact, self.settings)
        self._ranker = ranker or XGBoostRanker(artifact)
        names = m.item_feature_names
        self._avg_rating_col = names.index(schema.ITEM_AVG_RATING) if schema.ITEM_AVG_RATING in names else None
        self._count_col = names.index(schema.ITEM_RATING_COUNT) if schema.ITEM_RATING_COUNT in names else None

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, settings: Settings | None = None) -> TwoStageRecommender:
        return cls(load_artifact(Path(model_dir), verify_checksums=False), settings)

    def recommend(self, request: RecommendationRequest) -> Recommendation:
        return self.recommend_many([request])[0]

    def recommend_many(self, requests: Sequence[RecommendationRequest]) -> list[Recommendation]:
        """Answer several users with one matrix product, one feature fetch and one XGBoost call."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.settings.feature_store_deadline_ms / 1000.0

        # Stage 1: retrieval (known users together, unknown users from the popularity list).
        excluded = [self._exclusions(r) for r in requests]
        allowed = [self._filter.allowed(r.filters) for r in requests]
        known = [p for p, r in enumerate(requests) if r.user_id in self._user_index]
        known_set = set(known)
        candidates: list[Candidates | None] = [None] * len(requests)
        retrieved = self._retriever.retrieve(
            [self._user_index[requests[p].user_id] for p in known],
            [requests[p].num_candidates for p in known],
            [excluded[p] for p in known],
            [allowed[p] for p in known],
        )
        for p, c in zip(known, retrieved):
            candidates[p] = c
        for p, r in enumerate(requests):
            if candidates[p] is None:
                if (r.on_unknown_user or self.settings.unknown_user) == "error":
                    raise UserNotFound(f"user_id {r.user_id!r} is not in the model")
                candidates[p] = self._retriever.popular(r.top_k, excluded[p], allowed[p])
        t_retrieval = time.perf_counter()

        # Features: one fetch for the deduplicated candidates of every user.
        all_idx = np.concatenate([c.item_idx for c in candidates if c is not None] or [np.empty(0, np.int64)])
        unique_idx, inverse = np.unique(all_idx, return_inverse=True)
        batch = self._features.get(unique_idx, deadline)
        item_rows = batch.values[inverse]
        t_features = time.perf_counter()

        # Stage 2: one ranker call over every known user's candidates.
        bounds = np.cumsum([0] + [len(c.item_idx) for c in candidates if c is not None])
        ranked_rows = [(p, bounds[p], bounds[p + 1]) for p in known]
        scores = np.full(len(all_idx), np.nan, dtype=np.float32)
        ratings = np.full(len(all_idx), np.nan, dtype=np.float32)
        if ranked_rows:
            sel = np.concatenate([np.arange(a, b) for _, a, b in ranked_rows])
            user_rows = np.concatenate(
                [
                    np.repeat(
                        np.asarray(self.artifact.user_features[self._user_index[requests[p].user_id]])[None, :],
                        b - a,
                        axis=0,
                    )
                    for p, a, b in ranked_rows
                ]
            )
            mf = np.concatenate([candidates[p].mf_score for p, _, _ in ranked_rows])  # type: ignore[union-attr]
            ranked = self._ranker.score(mf, user_rows, item_rows[sel])
            scores[sel], ratings[sel] = ranked.score, ranked.predicted_rating
        t_ranking = time.perf_counter()

        timings = {
            "retrieval": _ms(started, t_retrieval),
            "features": _ms(t_retrieval, t_features),
            "ranking": _ms(t_features, t_ranking),
            "total": _ms(started, t_ranking),
        }
        out = []
        for p, r in enumerate(requests):
            c = candidates[p]
            assert c is not None
            a, b = bounds[p], bounds[p + 1]
            if p in known_set:
                items = self._ranked_items(c.item_idx, scores[a:b], ratings[a:b], r.top_k)
                fallback = None
            else:
                items = self._popular_items(c.item_idx, item_rows[a:b], r.top_k)
                fallback = FALLBACK_POPULAR
            out.append(Recommendation(r.user_id, items, fallback, batch.degraded, dict(timings)))
        return out

    def _ranked_items(
        self, item_idx: np.ndarray, scores: np.ndarray, ratings: np.ndarray, top_k: int
    ) -> list[dict[str, Any]]:
        # Stable sort on -score keeps the MF order among equal ranker scores.
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [
            {
                self.item_id_field: self.artifact.item_ids[int(item_idx[o])],
                "predicted_rating": round(float(ratings[o]), 4),
                "score": float(scores[o]),
                "rank": rank,
            }
            for rank, o in enumerate(order, start=1)
        ]

    def _popular_items(self, item_idx: np.ndarray, rows: np.ndarray, top_k: int) -> list[dict[str, Any]]:
        """Cold start: popularity order; the item's average rating is the non-personal estimate."""
        items = []
        for rank, (idx, row) in enumerate(zip(item_idx[:top_k], rows[:top_k]), start=1):
            avg = _finite(row[self._avg_rating_col]) if self._avg_rating_col is not None else None
            count = _finite(row[self._count_col]) if self._count_col is not None else None
            items.append(
                {
                    self.item_id_field: self.artifact.item_ids[int(idx)],
                    "predicted_rating": avg,
                    "score": count,
                    "rank": rank,
                }
            )
        return items

    def _exclusions(self, request: RecommendationRequest) -> np.ndarray:
        idx = [self._item_index[i] for i in request.exclude_items if i in self._item_index]
        return np.asarray(idx, dtype=np.int64)


def get_recommendations(user_id: str, recommender: TwoStageRecommender, top_k: int = 10) -> list[dict[str, Any]]:
    """The original design's API: the top ``top_k`` items, each a dict with the item id field
    and ``predicted_rating``."""
    request = RecommendationRequest(user_id=user_id, top_k=top_k, num_candidates=max(100, top_k))
    return recommender.recommend(request).items


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000.0, 3)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
