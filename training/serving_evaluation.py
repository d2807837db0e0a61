"""The report's two-stage numbers, asked of the serving recommender itself.

The offline report does not score the ranker's own matrix: it writes the models it evaluates as an
artifact (each user's interactions before the held-out period as what they have seen; every
interaction in the item timelines, which the point-in-time features read only up to each request's
``as_of``), loads it into :class:`~twostage_rec.recommender.TwoStageRecommender`, the class behind
``/invocations``, and asks it for every held-out user with ``as_of`` = the held-out interaction's
time. :func:`parity` checks, on a sample of queries, that training's feature matrix equals serving's
for the same moment (every feature, candidates in the same order) and that the top 10 agree: the
ranker is trained on exactly what it will see.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluation import DEPTH, K, Period, per_user_ndcg
from training.ranker_data import CandidateRows
from training.report import MINUS_BEST_SOURCE
from twostage_rec.artifact import ArtifactParts, write_artifact
from twostage_rec.recommender import TwoStageRecommender
from twostage_rec.request import RecommendationRequest
from twostage_rec.settings import Settings

BATCH = 100  # users per recommend_many call, as a serving batch
PARITY_QUERIES = 500
# Features equal within this (float32 arithmetic in both paths; the inputs are the same numbers).
PARITY_TOLERANCE = 1e-6
# Real gap between a user's last interaction and the held-out one: the report's buckets.
GAP_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("< 1 hour", 0.0, 3600.0),
    ("1 hour to 1 day", 3600.0, 86_400.0),
    ("1 to 30 days", 86_400.0, 30 * 86_400.0),
    ("over 30 days", 30 * 86_400.0, np.inf),
)
LATER_ASK_S = 90 * 86_400  # the robustness figure: every request asked 90 days after its interaction


@contextmanager
def serving_recommender(parts: ArtifactParts, scratch: Path | None = None) -> Iterator[TwoStageRecommender]:
    """The recommender of ``parts``, written to a temporary model directory and loaded as serving
    loads it (embedded item features, exact retrieval: the report's artifact has no ANN index)."""
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=".evaluation-model-", dir=scratch))
    try:
        write_artifact(parts, directory / "model")
        yield TwoStageRecommender.from_model_dir(directory / "model", Settings())
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def requests_of(
    period: Period, user_ids: Sequence[str], shift_s: int = 0, depth: int = DEPTH
) -> list[RecommendationRequest]:
    """One request per query: the user, ``as_of`` = the held-out interaction's time (+ ``shift_s``),
    the report's ``DEPTH`` candidates and the best ``depth`` back."""
    return [
        RecommendationRequest(user_ids[int(u)], top_k=depth, num_candidates=DEPTH, as_of=int(t) + shift_s)
        for u, t in zip(period.user_idx.tolist(), period.at_time.tolist())
    ]


def served_ranking(recommender: TwoStageRecommender, requests: Sequence[RecommendationRequest]) -> np.ndarray:
    """(len(requests), depth) item indices, best first, -1 padded: what the recommender answers."""
    depth = max((r.top_k for r in requests), default=DEPTH)
    ranking = np.full((len(requests), depth), -1, dtype=np.int64)
    field = recommender.item_id_field
    for start in range(0, len(requests), BATCH):
        answers = recommender.recommend_many(requests[start : start + BATCH])
        for row, answer in enumerate(answers, start=start):
            idx = recommender.artifact.item_ids.positions([item[field] for item in answer.items])
            ranking[row, : len(idx)] = idx
    return ranking


def parity(
    recommender: TwoStageRecommender,
    rows: CandidateRows,
    period: Period,
    user_ids: Sequence[str],
    training_ranking: np.ndarray,
    n: int = PARITY_QUERIES,
    seed: int = 0,
) -> dict[str, Any]:
    """Training's rows against serving's for a seeded sample of ``period``'s queries at their own
    time: the largest feature difference, and how many queries have the same candidates (in the same
    order), the same features and the same top 10."""
    picked = np.sort(np.random.default_rng(seed).choice(len(period), min(n, len(period)), replace=False))
    sample = period.subset(picked)
    requests = requests_of(sample, user_ids)
    merged, x = recommender.ranker_inputs(requests)
    starts = np.concatenate([[0], np.cumsum([len(m.item_idx) for m in rows.merged])])
    served_starts = np.concatenate([[0], np.cumsum([len(m.item_idx) for m in merged])])
    same_candidates = same_features = 0
    largest = 0.0
    for k, q in enumerate(picked.tolist()):
        mine = rows.merged[q].item_idx
        if not np.array_equal(mine, merged[k].item_idx):
            continue
        same_candidates += 1
        a = rows.x[starts[q] : starts[q + 1]]
        b = x[served_starts[k] : served_starts[k + 1]]
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        difference = np.inf if (nan_a != nan_b).any() else float(np.abs(np.where(nan_a, 0.0, a - b)).max(initial=0.0))
        largest = max(largest, difference)
        same_features += difference <= PARITY_TOLERANCE
    served = served_ranking(recommender, requests_of(sample, user_ids, depth=K))
    same_top = int(np.all(served == training_ranking[picked, :K], axis=1).sum())
    return {
        "queries": len(picked),
        "same_candidates": same_candidates,
        "same_features": int(same_features),
        "same_top10": same_top,
        "max_abs_feature_difference": largest,
    }


def by_gap(rankings: dict[str, np.ndarray], period: Period) -> dict[str, dict[str, Any]]:
    """NDCG@10 of each ranking per real-gap bucket (the held-out time minus the last interaction's)."""
    gap = period.at_time - last_times(period)
    out: dict[str, dict[str, Any]] = {}
    for name, low, high in GAP_BUCKETS:
        rows = np.flatnonzero((gap >= low) & (gap < high))
        bucket: dict[str, Any] = {"users": len(rows)}
        values: dict[str, np.ndarray] = {}
        for model, ranking in rankings.items():
            if not len(rows):  # an empty bucket has no mean (null in metrics.json, not NaN)
                bucket[model] = {"ndcg@10": None, "ndcg@10_se": None}
                continue
            values[model] = per_user_ndcg(ranking[rows], period.target[rows])
            bucket[model] = {"ndcg@10": float(values[model].mean()), "ndcg@10_se": _se(values[model])}
        sources = [m for m in values if m != "two_stage"]
        if "two_stage" in values and sources:
            # Paired over the bucket's users: far tighter than the two error bars side by side.
            best = max(sources, key=lambda m: float(values[m].mean()))
            diff = values["two_stage"] - values[best]
            bucket[MINUS_BEST_SOURCE] = {"source": best, "ndcg@10": float(diff.mean()), "ndcg@10_se": _se(diff)}
        out[name] = bucket
    return out


def _se(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def last_times(period: Period) -> np.ndarray:
    """Each query's last interaction time before it (the query's own time when it has none)."""
    out = period.at_time.copy()
    for q in range(len(period)):
        start, end = period.history_bounds(q)
        if end > start:
            out[q] = period.histories.timestamps[end - 1]
    return out
