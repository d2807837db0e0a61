"""The whole training run: data -> split -> MF -> ranker -> evaluation -> refit -> artifact.

Protocol (see README "Offline evaluation"):
1. Temporal leave-last-out: each user's last interaction is the test item, the one before it
   the validation item.
2. Stage 1 is trained on the train split for each retrieval objective; early stopping and the
   choice of objective use validation Recall@100.
3. Stage 2 learns on the validation period: the stage-1 model's top-100 unseen candidates of each
   user, labelled with the validation rating (0 for candidates the user did not choose), with
   point-in-time features as of the validation timestamp.
4. Test: stage 1 refit on train + validation with the chosen epoch count; popularity, MF-only and
   MF + ranker rank every unseen item (no sampled negatives).
5. The shipped artifact is refit on ALL interactions with the chosen epochs and trees.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training import metrics as m
from training.ann_index import with_ann_index
from training.datasets import Dataset
from training.indexing import IdIndex, build_index, csr_from_pairs
from training.mf import MFConfig, MFResult, train_mf
from training.ranker import RankerConfig, RankerResult, train_ranker, train_rating_model
from training.ranker_features import (
    ITEM_FEATURES,
    RANKER_FEATURES,
    USER_FEATURES,
    build_ranker_matrix,
    category_vocabulary,
    point_in_time_item_features,
    point_in_time_user_features,
    snapshot_item_features,
    snapshot_user_features,
)
from twostage_rec import schema
from twostage_rec.artifact import ArtifactParts, FeatureStoreSchema, Manifest, pack_model_tar, write_artifact
from twostage_rec.features import feature_store_name

logger = logging.getLogger(__name__)

N_CANDIDATES = 100
K = 10
EVENT_TIME_FEATURE = "event_time"
FEATURE_STORE_TYPES = {
    schema.ITEM_AVG_RATING: "Fractional",
    schema.ITEM_RATING_COUNT: "Integral",
    schema.ITEM_RECENT_COUNT: "Integral",
    schema.ITEM_DAYS_SINCE_FIRST: "Fractional",
    schema.CATEGORY: "String",
    schema.PRICE: "Fractional",
    schema.YEAR: "Integral",
}


@dataclass(frozen=True)
class PipelineConfig:
    objectives: tuple[str, ...] = ("bpr", "rating")
    retrieval_objective: str | None = None  # None = choose by validation Recall@100
    mf: MFConfig = field(default_factory=MFConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    feature_group_name: str | None = None
    # Interactions per user held out of the train split to teach the ranker (users need more
    # than ranker_period + 2 train rows to take part).
    ranker_period: int = 5
    show_progress: bool = True


@dataclass(frozen=True)
class Encoded:
    """Integer-indexed arrays of an interaction table."""

    user_idx: np.ndarray
    item_idx: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray

    @classmethod
    def of(cls, frame: pd.DataFrame, users: IdIndex, items: IdIndex) -> Encoded:
        return cls(
            users.idx(frame[schema.USER_ID]),
            items.idx(frame[schema.ITEM_ID]),
            frame[schema.RATING].to_numpy(np.float32, copy=True),
            frame[schema.TIMESTAMP].to_numpy(np.int64),
        )


@dataclass
class RunResult:
    metrics: dict[str, Any]
    model_dir: Path
    tar_path: Path


def run(dataset: Dataset, out_dir: Path, config: PipelineConfig = PipelineConfig()) -> RunResult:
    """Train, evaluate, refit and write ``out_dir/model``, ``out_dir/model.tar.gz`` and metrics."""
    from training.split import leave_last_out

    timings: dict[str, float] = {}
    clock = functools.partial(_timed, timings)
    inter = dataset.interactions
    users = build_index(inter[schema.USER_ID])
    # Items nobody interacted with have untrained factors: they would be retrieved at random.
    items = build_index(inter[schema.ITEM_ID])
    categories = category_vocabulary(dataset.items)
    logger.info("%s: %d interactions, %d users, %d items", dataset.name, len(inter), len(users), len(items))

    with clock("split"):
        split = leave_last_out(inter)
        train = Encoded.of(split.train, users, items)
        val = Encoded.of(split.validation, users, items)
        test = Encoded.of(split.test, users, items)
        train_val = _concat(train, val)
    n_users, n_items = len(users), len(items)
    integer_labels = config.ranker.objective == "rank:ndcg"
    if len(val.user_idx) == 0:
        raise ValueError("no user has 3 or more interactions: nothing to validate or test on")

    # Stage 1 on the train split, one model per objective; validation Recall@100 decides.
    fits: dict[str, MFResult] = {}
    val_recall: dict[str, float] = {}
    for objective in config.objectives:
        with clock(f"mf_{objective}"):
            fits[objective] = _fit_mf(n_users, n_items, train, _with(config, objective), validation=val)
        val_recall[objective] = max(h.get("val_recall@100", 0.0) for h in fits[objective].history)
    chosen = config.retrieval_objective or max(val_recall, key=lambda o: val_recall[o])
    mf_train = fits[chosen]
    logger.info("retrieval objective %s (validation Recall@100 %s)", chosen, _fmt(val_recall))

    # Stage 2 learns on a ranker period: each user's last few training interactions, with
    # candidates from a stage-1 model fit on the rows before them (so the ranker sees what serving
    # shows: unseen items), several positives per user, features as of the period's start.
    with clock("ranker"):
        early, late = hold_out_recent(train, config.ranker_period)
        if len(late.user_idx) == 0:
            raise ValueError("no user has enough interactions for a ranker period; lower --ranker-period")
        mf_early = _fit_mf(n_users, n_items, early, _with(config, chosen), fixed_epochs=mf_train.best_epoch)
        x_rk, y_rk, g_rk = _ranker_rows(mf_early, early, late, inter, dataset, users, items, categories, integer_labels)
        ranker = train_ranker(x_rk, y_rk, g_rk, config.ranker, RANKER_FEATURES)
        rating_model = train_rating_model(x_rk, y_rk, g_rk, config.ranker, RANKER_FEATURES)
        # The validation period is untouched by the ranker: it tells whether stage 2 helps.
        x_val, y_val, g_val = _ranker_rows(
            mf_train, train, val, inter, dataset, users, items, categories, integer_labels
        )
        validation = _validation_report(ranker, x_val, y_val, g_val)
        logger.info(
            "validation NDCG@10: MF-only %.4f, two-stage %.4f", validation["mf_ndcg@10"], validation["two_stage_ndcg@10"]
        )

    # Test: stage 1 refit on train + validation with the chosen epoch count.
    with clock("evaluation"):
        mf_test = _fit_mf(n_users, n_items, train_val, _with(config, chosen), fixed_epochs=mf_train.best_epoch)
        report = _evaluate(mf_test, ranker, train_val, test, inter, dataset, users, items, categories)

    # The shipped model: stage 1 refit on all interactions; stage 2 refit on every labelled period
    # it has rows for (ranker period + validation), both with the counts chosen above.
    with clock("refit"):
        everything = Encoded.of(inter, users, items)
        mf_all = _fit_mf(n_users, n_items, everything, _with(config, chosen), fixed_epochs=mf_train.best_epoch)
        x_all, y_all = np.vstack([x_rk, x_val]), np.concatenate([y_rk, y_val])
        g_all = np.concatenate([g_rk, g_val + n_users])  # a user's two periods are two queries
        ranker_all = train_ranker(x_all, y_all, g_all, config.ranker, RANKER_FEATURES, fixed_rounds=ranker.best_rounds)
        rating_all = train_rating_model(
            x_all, y_all, g_all, config.ranker, RANKER_FEATURES, fixed_rounds=rating_model.best_rounds
        )

    with clock("artifact"):
        model_dir = out_dir / "model"
        manifest = _write_model(
            model_dir, dataset, config, chosen, mf_all, ranker_all, rating_all, everything, users, items, categories
        )
        tar_path = pack_model_tar(model_dir, out_dir / "model.tar.gz")

    metrics = {
        "dataset": dataset.name,
        "n_users": n_users,
        "n_items": n_items,
        "n_interactions": int(len(inter)),
        "n_test_users": int(len(test.user_idx)),
        **report,
        "retrieval_objective": chosen,
        "objectives": {
            o: {"val_recall@100": val_recall[o], "best_epoch": fits[o].best_epoch} for o in config.objectives
        },
        "validation": validation,
        "ranker": {
            "objective": config.ranker.objective,
            "ranker_period": config.ranker_period,
            "best_rounds": ranker.best_rounds,
            "training_rows": int(len(y_rk)),
            "training_positives": int((y_rk > 0).sum()),
            "feature_importance": ranker_all.feature_importance,
        },
        "rating_model": {
            "best_rounds": rating_model.best_rounds,
            "training_rows": int((y_rk > 0).sum()),
            "validation_rmse": _rmse(rating_model, x_val, y_val),
        },
        "model_version": manifest.model_version,
        "timings_s": timings,
    }
    return RunResult(metrics, model_dir, tar_path)


def _fit_mf(
    n_users: int,
    n_items: int,
    data: Encoded,
    config: PipelineConfig,
    validation: Encoded | None = None,
    fixed_epochs: int | None = None,
) -> MFResult:
    return train_mf(
        n_users,
        n_items,
        data.user_idx,
        data.item_idx,
        data.rating,
        config.mf,
        validation=None if validation is None else (validation.user_idx, validation.item_idx),
        fixed_epochs=fixed_epochs,
    )


def _with(config: PipelineConfig, objective: str) -> PipelineConfig:
    return replace(config, mf=replace(config.mf, objective=objective, show_progress=config.show_progress))


def _candidates(mf: MFResult, seen: Encoded, n_users: int, users: np.ndarray) -> np.ndarray:
    indptr, indices = csr_from_pairs(seen.user_idx, seen.item_idx, n_users)
    return m.top_k_unseen(mf.user_vectors, mf.item_vectors, users, indptr, indices, N_CANDIDATES)


def hold_out_recent(data: Encoded, n: int) -> tuple[Encoded, Encoded]:
    """Split off each user's last ``n`` rows (by time; users with more than ``n + 2`` rows)."""
    order = np.lexsort((np.arange(len(data.user_idx)), data.timestamp, data.user_idx))
    users = data.user_idx[order]
    starts = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1]
    sizes = np.diff(np.r_[starts, len(users)])
    position = np.arange(len(users)) - np.repeat(starts, sizes)
    from_end = np.repeat(sizes, sizes) - position
    late = (from_end <= n) & (np.repeat(sizes, sizes) > n + 2)
    pick = lambda mask: Encoded(*(v[order][mask] for v in data.__dict__.values()))  # noqa: E731
    return pick(~late), pick(late)


def _ranker_rows(
    mf: MFResult,
    seen: Encoded,
    labels: Encoded,
    history: pd.DataFrame,
    dataset: Dataset,
    users: IdIndex,
    items: IdIndex,
    categories: list[str],
    integer_labels: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled candidate rows: for each user in ``labels``, the top unseen candidates of ``mf``
    with features as of the user's first label time; label = the rating if the user chose the
    candidate in ``labels``, else 0. Returns (X, y, user_idx per row)."""
    order = np.lexsort((labels.timestamp, labels.user_idx))
    ordered = labels.user_idx[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    target_users, at_time = ordered[first], labels.timestamp[order][first]
    cands = _candidates(mf, seen, len(users), target_users)
    x = _candidate_matrix(mf, cands, target_users, at_time, history, dataset, users, items, categories)
    n_items = len(items)
    label_key = labels.user_idx.astype(np.int64) * n_items + labels.item_idx
    key_order = np.argsort(label_key)
    sorted_keys = label_key[key_order]
    cand_key = np.repeat(target_users.astype(np.int64), cands.shape[1]) * n_items + cands.ravel()
    pos = np.minimum(np.searchsorted(sorted_keys, cand_key), len(sorted_keys) - 1)
    hit = sorted_keys[pos] == cand_key
    y = np.where(hit, labels.rating[key_order][pos], 0.0).astype(np.float32)
    if integer_labels:
        y = np.rint(y)  # rank:ndcg wants integer relevance degrees
    groups = np.repeat(target_users, cands.shape[1])
    real = cands.ravel() >= 0  # -1 pads the lists of users with fewer unseen items than slots
    return x[real], y[real], groups[real]


def _candidate_matrix(
    mf: MFResult,
    cands: np.ndarray,
    user_idx: np.ndarray,
    at_time: np.ndarray,
    history: pd.DataFrame,
    dataset: Dataset,
    users: IdIndex,
    items: IdIndex,
    categories: list[str],
) -> np.ndarray:
    n_cands = cands.shape[1]
    flat_items = np.maximum(cands.ravel(), 0)  # padding slots (-1) get item 0's row; callers drop them
    rows_user = np.repeat(user_idx, n_cands)
    mf_scores = np.einsum("ij,ij->i", mf.user_vectors[rows_user], mf.item_vectors[flat_items])
    user_ids = np.asarray(users.ids, dtype=object)
    item_ids = np.asarray(items.ids, dtype=object)
    user_feats = point_in_time_user_features(history, user_ids[user_idx], at_time)
    item_feats = point_in_time_item_features(
        history, dataset.items, item_ids[flat_items], np.repeat(at_time, n_cands), categories
    )
    return build_ranker_matrix(mf_scores, np.repeat(user_feats, n_cands, axis=0), item_feats)


def _validation_report(ranker: RankerResult, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """NDCG@10 of the MF order and of the ranker's order over the validation candidates."""
    scores = ranker.booster.inplace_predict(x)
    result = {}
    for name, key in (("mf", x[:, 0]), ("two_stage", scores)):
        ndcg = []
        for user_rows in np.split(np.arange(len(y)), np.flatnonzero(np.diff(groups)) + 1):
            top = user_rows[np.argsort(-key[user_rows], kind="stable")[:K]]
            hits = np.flatnonzero(y[top] > 0)
            ndcg.append(1.0 / np.log2(hits[0] + 2) if len(hits) else 0.0)
        result[f"{name}_ndcg@10"] = float(np.mean(ndcg))
    return result


def _evaluate(
    mf: MFResult,
    ranker: RankerResult,
    seen: Encoded,
    test: Encoded,
    history: pd.DataFrame,
    dataset: Dataset,
    users: IdIndex,
    items: IdIndex,
    categories: list[str],
) -> dict[str, dict[str, float]]:
    n_users, n_items = len(users), len(items)
    target = test.item_idx
    indptr, indices = csr_from_pairs(seen.user_idx, seen.item_idx, n_users)
    popular = m.popularity_ranking(seen.item_idx, n_items, test.user_idx, indptr, indices, N_CANDIDATES)
    cands = m.top_k_unseen(mf.user_vectors, mf.item_vectors, test.user_idx, indptr, indices, N_CANDIDATES)
    x = _candidate_matrix(mf, cands, test.user_idx, test.timestamp, history, dataset, users, items, categories)
    scores = ranker.booster.inplace_predict(x).reshape(cands.shape)
    scores[cands < 0] = -np.inf  # padding stays at the end
    order = np.argsort(-scores, axis=1, kind="stable")
    reranked = np.take_along_axis(cands, order, axis=1)

    def block(ranked: np.ndarray) -> dict[str, float]:
        return {
            "hr@10": m.hit_rate_at_k(ranked, target, K),
            "ndcg@10": m.ndcg_at_k(ranked, target, K),
            "recall@100": m.recall_at_k(ranked, target, N_CANDIDATES),
            "coverage@10": m.coverage_at_k(ranked, n_items, K),
        }

    return {"popularity": block(popular), "mf": block(cands), "two_stage": block(reranked)}


def _write_model(
    model_dir: Path,
    dataset: Dataset,
    config: PipelineConfig,
    objective: str,
    mf: MFResult,
    ranker: RankerResult,
    rating_model: RankerResult,
    everything: Encoded,
    users: IdIndex,
    items: IdIndex,
    categories: list[str],
) -> Manifest:
    n_users, n_items = len(users), len(items)
    inter = dataset.interactions
    as_of = int(inter[schema.TIMESTAMP].max()) + 1  # every interaction counts
    indptr, indices = csr_from_pairs(everything.user_idx, everything.item_idx, n_users)
    counts = np.bincount(everything.item_idx, minlength=n_items)
    popular = np.lexsort((np.arange(n_items), -counts)).astype(np.int32)
    version = f"{dataset.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    group = config.feature_group_name or default_feature_group_name(dataset.name)
    fs_types = {feature_store_name(f): FEATURE_STORE_TYPES[feature_store_name(f)] for f in ITEM_FEATURES}
    manifest = Manifest(
        model_version=version,
        item_id_field=dataset.item_id_field,
        n_users=n_users,
        n_items=n_items,
        factor_dim=int(mf.user_vectors.shape[1]),
        rating_min=float(dataset.rating_scale[0]),
        rating_max=float(dataset.rating_scale[1]),
        ranker_objective=config.ranker.objective,
        ranker_features=list(RANKER_FEATURES),
        user_feature_names=list(USER_FEATURES),
        item_feature_names=list(ITEM_FEATURES),
        categories=list(categories),
        feature_store=FeatureStoreSchema(
            feature_group_name=group,
            record_identifier_name=dataset.item_id_field,
            event_time_feature_name=EVENT_TIME_FEATURE,
            feature_types=fs_types,
        ),
        retrieval_objective=objective,
        dataset=dataset.name,
        extra={"features_as_of": as_of, "mf_best_epoch": mf.best_epoch, "ranker_rounds": ranker.best_rounds},
    )
    return write_artifact(
        with_ann_index(ArtifactParts(
            manifest=manifest,
            user_ids=users.ids,
            item_ids=items.ids,
            user_factors=mf.user_vectors,
            item_factors=mf.item_vectors,
            seen_indptr=indptr,
            seen_indices=indices,
            user_features=snapshot_user_features(inter, users.ids, as_of),
            item_features=snapshot_item_features(inter, dataset.items, items.ids, as_of, categories),
            popular_items=popular,
            ranker_bytes=bytes(ranker.booster.save_raw("ubj")),
            rating_model_bytes=bytes(rating_model.booster.save_raw("ubj")),
            feature_importance=ranker.feature_importance,
        )),
        model_dir,
    )


def default_feature_group_name(dataset_name: str) -> str:
    """Feature group names allow letters, digits and hyphens, up to 64 characters."""
    return (re.sub(r"[^A-Za-z0-9-]+", "-", f"twostage-{dataset_name}-items").strip("-"))[:64]


def _concat(a: Encoded, b: Encoded) -> Encoded:
    return Encoded(*(np.concatenate([x, y]) for x, y in zip(a.__dict__.values(), b.__dict__.values())))


def _rmse(model: RankerResult, x: np.ndarray, y: np.ndarray) -> float:
    """RMSE of the predicted rating on the validation period's chosen items (a held-out period)."""
    chosen = y > 0
    if not chosen.any():
        return float("nan")
    predicted = model.booster.inplace_predict(x[chosen])
    return float(np.sqrt(np.mean((predicted - y[chosen]) ** 2)))


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in values.items())


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall-clock seconds of a named stage into ``timings``."""
    logger.info("stage %s ...", name)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)


def format_table(metrics: dict[str, Any]) -> str:
    """The side-by-side quality table printed at the end of a run."""
    rows = [("model", "HR@10", "NDCG@10", "Recall@100", "Coverage@10")]
    for name in ("popularity", "mf", "two_stage"):
        b = metrics[name]
        rows.append((name, *(f"{b[k]:.4f}" for k in ("hr@10", "ndcg@10", "recall@100", "coverage@10"))))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def recommend_file(model_dir: Path, users_file: Path, k: int, out: Path) -> int:
    """Write one JSON line per user id in ``users_file`` with the container's own recommender."""
    import json

    from twostage_rec.recommender import TwoStageRecommender
    from twostage_rec.request import RecommendationRequest
    from twostage_rec.settings import Settings

    recommender = TwoStageRecommender.from_model_dir(model_dir, Settings())
    field_name = recommender.item_id_field
    user_ids = [line.strip() for line in users_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for start in range(0, len(user_ids), 100):
            chunk: Sequence[str] = user_ids[start : start + 100]
            answers = recommender.recommend_many(
                [RecommendationRequest(u, top_k=k, num_candidates=max(N_CANDIDATES, k)) for u in chunk]
            )
            for answer in answers:
                items_ = [i[field_name] for i in answer.items]
                handle.write(json.dumps({"user_id": answer.user_id, "items": items_}, ensure_ascii=False) + "\n")
    return len(user_ids)
