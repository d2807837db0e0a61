"""The deployment-like evaluation: train up to a date, then serve the weeks after it.

Leave-last-out asks every user about their very next interaction, with a model that saw everyone
else's interactions up to then. A team that retrains weekly sees something else: a model frozen at
its training date, asked days or weeks later, knowing only what the endpoint knows. This replay
measures that:

1. The cut-off ``T`` is the time before which ``REPLAY_QUANTILE`` of the interactions fall. The whole
   pipeline (``training.pipeline.run``, its own tuning included; no baselines or ablations) trains a
   model on the interactions before ``T`` and writes it as the real artifact.
2. Every interaction after ``T`` becomes a request to that artifact's recommender (the class behind
   ``/invocations``), in time order, with ``as_of`` = the interaction's time:
   - **fresh history**: the user's interactions since ``T`` before this one go in ``recent_items``,
     as the endpoint gets them from the user-history Feature Store group or the request;
   - **frozen history**: nothing since ``T`` (the model's own history only).
   It scores whether the interacted item is in the top 10 (HR@10, NDCG@10).
3. Baselines given the same fresh history: the recent-item kNN and the SASRec-style source alone (the
   artifact's own sources); and frozen ones: popularity and EASE fit on the interactions before ``T``.

Item statistics are those the artifact knows (at its data end, ``twostage_rec.timelines``): the replay
shows what that staleness costs week by week. An interaction with an item the model has never seen
is a miss for every model (the report gives their share).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.baselines import ease
from training.datasets import DataError, Dataset
from training.evaluation import K
from training.interactions import Histories
from training.report_budget import plan_ease
from training.split import tie_hash
from twostage_rec import schema
from twostage_rec.artifact import ModelArtifact
from twostage_rec.recommender import TwoStageRecommender
from twostage_rec.request import MAX_RECENT_ITEMS, RecentItem, RecommendationRequest
from twostage_rec.settings import Settings
from twostage_rec.sources.merge import PopularItems
from twostage_rec.timelines import Timeline

logger = logging.getLogger(__name__)

REPLAY_QUANTILE = 0.9
MAX_EVENTS = 50_000  # requests scored (a seeded sample above it): each costs a recommendation per model
BATCH = 100
WEEK_S = 7 * 86_400
# Weeks since training, as the report groups them: each of the first eight, then wider bands.
WEEK_GROUPS: tuple[tuple[str, int, int], ...] = (
    *((str(w), w, w) for w in range(1, 9)),
    ("9-13", 9, 13),
    ("14-26", 14, 26),
    ("27-52", 27, 52),
    ("53+", 53, 10**9),
)
DEFAULT_EASE_LAMBDA = 1000.0


@dataclass(frozen=True)
class ReplayEvents:
    """The interactions after the cut-off, grouped by user and in time order within each user."""

    user_ids: np.ndarray  # object, one per event
    item_ids: np.ndarray  # object
    timestamps: np.ndarray  # int64
    position: np.ndarray  # int64: the event's position among its user's events since the cut-off
    start: np.ndarray  # int64: the row of the user's first event since the cut-off

    def __len__(self) -> int:
        return len(self.user_ids)


def cutoff(dataset: Dataset, quantile: float = REPLAY_QUANTILE) -> int:
    """The time before which ``quantile`` of the interactions fall (epoch seconds)."""
    times = np.sort(dataset.interactions[schema.TIMESTAMP].to_numpy())
    return int(times[min(len(times) - 1, int(np.ceil(quantile * len(times))))])


def split_at(dataset: Dataset, at: int) -> tuple[Dataset, ReplayEvents]:
    """The dataset of the interactions before ``at``, and the events from ``at`` on."""
    inter = dataset.interactions
    before = inter[inter[schema.TIMESTAMP] < at]
    if before.empty:
        raise DataError(
            f"no interaction before the replay's cut-off {at}: nothing to train on (or run with --no-replay)"
        )
    for column in (schema.USER_ID, schema.ITEM_ID):  # the loaders' contract: categories in use only
        if isinstance(before[column].dtype, pd.CategoricalDtype):
            before = before.assign(**{column: before[column].cat.remove_unused_categories()})
    after = inter[inter[schema.TIMESTAMP] >= at]
    order = np.lexsort((tie_hash(after), after[schema.TIMESTAMP].to_numpy(), after[schema.USER_ID].astype(str)))
    users = after[schema.USER_ID].astype(str).to_numpy(dtype=object)[order]
    new_user = np.ones(len(users), dtype=bool)
    new_user[1:] = users[1:] != users[:-1]
    start = np.maximum.accumulate(np.where(new_user, np.arange(len(users)), 0))
    events = ReplayEvents(
        users,
        after[schema.ITEM_ID].astype(str).to_numpy(dtype=object)[order],
        after[schema.TIMESTAMP].to_numpy(np.int64)[order],
        np.arange(len(users)) - start,
        start,
    )
    return replace(dataset, name=f"{dataset.name}-before-replay", interactions=before.reset_index(drop=True)), events


def replay_requests(events: ReplayEvents, rows: np.ndarray, fresh: bool) -> list[RecommendationRequest]:
    """One request per event row: as of the event, with the user's earlier events since the cut-off
    (the latest ``MAX_RECENT_ITEMS``) as ``recent_items`` when ``fresh``."""
    out = []
    for row in rows.tolist():
        recent: tuple[RecentItem, ...] = ()
        if fresh:
            first = max(int(events.start[row]), row - MAX_RECENT_ITEMS)
            recent = tuple(RecentItem(events.item_ids[r], int(events.timestamps[r])) for r in range(first, row))
        out.append(
            RecommendationRequest(events.user_ids[row], top_k=K, num_candidates=100, recent_items=recent,
                                  as_of=int(events.timestamps[row]))
        )
    return out


def score(
    artifact: ModelArtifact,
    events: ReplayEvents,
    rows: np.ndarray,
    ease_lambda: float | None,
    refreshed: ModelArtifact | None = None,
) -> dict[str, np.ndarray]:
    """Each model's NDCG@10 per event row (1 / log2(rank + 2) when the item is in its top 10, else 0).

    ``ease_lambda``: None leaves EASE out (its matrix is over the report's budget).
    ``refreshed``: the same model with item timelines that run on past its training (as if item
    statistics were refreshed continuously), scored with fresh history: what staleness costs.
    """
    recommender = TwoStageRecommender(artifact, Settings())
    target = artifact.item_ids.positions(list(events.item_ids[rows]))
    user_idx = artifact.user_ids.positions(list(events.user_ids[rows]))
    top: dict[str, np.ndarray] = {}
    for fresh in (True, False):
        name = "two_stage_fresh" if fresh else "two_stage_frozen"
        top[name] = _top_items(recommender, replay_requests(events, rows, fresh))
    if refreshed is not None:
        top["two_stage_fresh_refreshed_items"] = _top_items(
            TwoStageRecommender(refreshed, Settings()), replay_requests(events, rows, fresh=True)
        )
    sources = _source_tops(recommender, replay_requests(events, rows, fresh=True))
    for source, label in (
        (schema.SOURCE_NEIGHBOURS, "item_knn_recent_fresh"),
        (schema.SOURCE_SEQUENCE, "sasrec_fresh"),
    ):
        if source in sources:
            top[label] = sources[source]
    top["popularity"] = _popularity(artifact, user_idx)
    if ease_lambda is not None:
        top["ease"] = _ease(artifact, user_idx, ease_lambda, top["popularity"])
    return {name: _ndcg(ranking, target) for name, ranking in top.items()}


def summarize(
    ndcg: dict[str, np.ndarray], events: ReplayEvents, rows: np.ndarray, at: int, known_items: np.ndarray
) -> dict[str, Any]:
    """metrics.json's ``replay``: each model overall and by week since training, fresh minus frozen."""
    week = (events.timestamps[rows] - at) // WEEK_S + 1
    out: dict[str, Any] = {"models": {name: _mean_se(values) for name, values in ndcg.items()}}
    for name, values in ndcg.items():
        out["models"][name]["hr@10"] = float((values > 0).mean())
    diff = ndcg["two_stage_fresh"] - ndcg["two_stage_frozen"]
    out["fresh_minus_frozen"] = _mean_se(diff)
    out["by_week"] = []
    for label, low, high in WEEK_GROUPS:
        picked = (week >= low) & (week <= high)
        if picked.any():
            out["by_week"].append(
                {"weeks": label, "events": int(picked.sum()),
                 **{name: float(values[picked].mean()) for name, values in ndcg.items()}}
            )
    out["unknown_item_share"] = float((~known_items).mean())
    return out


def run_replay(dataset: Dataset, out_dir: Path, config: Any, ease_lambda: float | None = None) -> dict[str, Any] | None:
    """Train on the interactions before the cut-off into ``out_dir/replay``, replay the rest; the
    ``replay`` block of metrics.json (None on a distributed run's other ranks, which only train)."""
    from training.pipeline import run  # the pipeline calls this module: imported when used

    at = cutoff(dataset)
    before, events = split_at(dataset, at)
    logger.info(
        "replay: training on the %d interactions before %s, then %d events after it",
        len(before.interactions), pd.Timestamp(at, unit="s", tz="UTC").isoformat(), len(events),
    )
    result = run(before, out_dir / "replay", replace(config, baselines=False, ablations=False))
    if result is None or not len(events):
        return None if result is None else {"events": 0}
    from twostage_rec.artifact import load_artifact

    artifact = load_artifact(result.model_dir, verify_checksums=False)
    rows = np.arange(len(events))
    if len(rows) > MAX_EVENTS:
        rows = np.sort(np.random.default_rng(0).choice(len(rows), MAX_EVENTS, replace=False))
    # EASE within the report's budget (training/report_budget.py), as in the leave-last-out report.
    lam = (ease_lambda or DEFAULT_EASE_LAMBDA) if plan_ease(artifact.manifest.n_items, config.report_budget).runs else None
    ndcg = score(artifact, events, rows, lam, refreshed_items(artifact, dataset))
    known_items = artifact.item_ids.positions(list(events.item_ids[rows])) >= 0
    summary = summarize(ndcg, events, rows, at, known_items)
    known_users = artifact.user_ids.positions(list(events.user_ids[rows])) >= 0
    summary.update(
        {
            "cutoff": pd.Timestamp(at, unit="s", tz="UTC").isoformat(),
            "cutoff_quantile": REPLAY_QUANTILE,
            "train_interactions": int(len(before.interactions)),
            "events": int(len(events)),
            "events_scored": int(len(rows)),
            "new_user_share": float((~known_users).mean()),
            "model_leave_last_out_ndcg@10": result.metrics["two_stage"]["ndcg@10"],
            "model_version": result.metrics["model_version"],
        }
    )
    return summary


def refreshed_items(artifact: ModelArtifact, dataset: Dataset) -> ModelArtifact:
    """``artifact`` with item timelines of every interaction in ``dataset`` (of the items it knows),
    through the last one: item statistics as a continuous refresh would keep them."""
    inter = dataset.interactions
    column = inter[schema.ITEM_ID]
    if isinstance(column.dtype, pd.CategoricalDtype):  # the loaders' ids: map each distinct id once
        positions = artifact.item_ids.positions([str(c) for c in column.cat.categories])
        codes = column.cat.codes.to_numpy()
        item_idx = np.where(codes >= 0, positions[codes], -1)
    else:
        item_idx = artifact.item_ids.positions([str(i) for i in column])
    keep = item_idx >= 0
    times = inter[schema.TIMESTAMP].to_numpy(np.int64)
    timeline = Timeline.build(
        item_idx[keep], times[keep], inter[schema.RATING].to_numpy(np.float64)[keep], artifact.manifest.n_items
    )
    return replace(
        artifact,
        manifest=replace(artifact.manifest, data_end=int(times.max()) + 1),
        item_timeline_indptr=timeline.indptr,
        item_timeline_timestamps=timeline.timestamps,
        item_timeline_rating_sums=timeline.rating_sums,
    )


def _top_items(recommender: TwoStageRecommender, requests: Sequence[RecommendationRequest]) -> np.ndarray:
    ranking = np.full((len(requests), K), -1, dtype=np.int64)
    field = recommender.item_id_field
    for start in range(0, len(requests), BATCH):
        for row, answer in enumerate(recommender.recommend_many(requests[start : start + BATCH]), start=start):
            idx = recommender.artifact.item_ids.positions([item[field] for item in answer.items])
            ranking[row, : len(idx)] = idx[:K]
    return ranking


def _source_tops(recommender: TwoStageRecommender, requests: Sequence[RecommendationRequest]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(requests), BATCH):
        for name, results in recommender.source_results(requests[start : start + BATCH]).items():
            ranking = out.setdefault(name, np.full((len(requests), K), -1, dtype=np.int64))
            for row, result in enumerate(results, start=start):
                ranking[row, : min(K, len(result.item_idx))] = result.item_idx[:K]
    return out


def _seen(artifact: ModelArtifact, user_idx: int) -> np.ndarray:
    if user_idx < 0:
        return np.empty(0, dtype=np.int64)
    return np.asarray(artifact.seen_indices[artifact.seen_indptr[user_idx] : artifact.seen_indptr[user_idx + 1]])


def _popularity(artifact: ModelArtifact, user_idx: np.ndarray) -> np.ndarray:
    popular = PopularItems(np.asarray(artifact.popular_items))
    ranking = np.full((len(user_idx), K), -1, dtype=np.int64)
    for row, u in enumerate(user_idx.tolist()):
        top = popular.top(K, _seen(artifact, u), None)
        ranking[row, : len(top)] = top
    return ranking


def _ease(artifact: ModelArtifact, user_idx: np.ndarray, lam: float, fallback: np.ndarray) -> np.ndarray:
    """EASE fit on the interactions before the cut-off, each user's profile then; a user the model
    does not know gets the popularity list (a frozen model knows nothing of them)."""
    indptr = np.asarray(artifact.seen_indptr)
    items = np.asarray(artifact.seen_indices, dtype=np.int64)
    histories = Histories(indptr, items, np.asarray(artifact.seen_timestamps), np.ones(len(items), np.float32))
    n_items = artifact.manifest.n_items
    scorer = ease.fit_ease(ease.item_gram(histories, n_items), lam).scorer(histories)
    known = np.flatnonzero(user_idx >= 0)
    unique, inverse = np.unique(user_idx[known], return_inverse=True)
    best = np.empty((len(unique), K), dtype=np.int64)
    for start in range(0, len(unique), 512):
        users = unique[start : start + 512]
        scores = np.asarray(scorer(users), dtype=np.float32)
        for k, u in enumerate(users.tolist()):
            scores[k, _seen(artifact, u)] = -np.inf
        best[start : start + len(users)] = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    ranking = fallback.copy()
    ranking[known] = best[inverse]
    return ranking


def _ndcg(ranking: np.ndarray, target: np.ndarray) -> np.ndarray:
    hit = (ranking == target[:, None]) & (target[:, None] >= 0)
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), K)
    return np.where(rank < K, 1.0 / np.log2(rank + 2.0), 0.0)


def _mean_se(values: np.ndarray) -> dict[str, float]:
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return {"ndcg@10": float(values.mean()), "ndcg@10_se": se}
