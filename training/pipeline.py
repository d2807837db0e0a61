"""The whole training run, in stages: split, stage-1 models, baselines, stage 2, test, refit, artifact.

Protocol (docs/evaluation.md, "The protocol"):
1. Temporal leave-last-out: each user's last interaction is the test item, the one before it the
   validation item. Every model ranks all items the user has not interacted with.
2. On the train split: MF (BPR), the item-neighbour lists and the sequence model, each tuned or
   early-stopped on validation; the baselines (popularity, EASE, Surprise SVD) tuned on validation;
   the fusion weights of stage 1 tuned on validation Recall@100.
3. Stage 2 learns on a ranker period: each user's last few training interactions, one query
   each, with the stage-1 models refit on the interactions before that period (so the ranker
   sees what serving shows it: candidates of models that never saw the answer). Rows are made by
   the serving code; features are point-in-time. The ranker's objective and rounds are chosen
   on the validation period, scored by the models fit on the whole train split.
4. Test, looked at once: models that learn from interactions (MF, neighbours, EASE, SVD,
   popularity) are refit on train + validation with the chosen settings; the sequence model reads
   the validation item in the history. Every model and the two-stage model side by side, with
   the per-source recall and ablations.
5. The shipped model: MF and neighbours refit on all interactions, the sequence model as trained
   on the train split (it reads each user's latest items at request time), the ranker refit on
   the ranker, validation and test periods with the chosen rounds.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from training.ann_index import with_ann_index
from training.baselines import ease, svd
from training.datasets import Dataset
from training.distributed import SINGLE, Distribution
from training.evaluation import (
    DEPTH,
    Period,
    SourceRun,
    candidates_ranking,
    ndcg_at_10,
    paired_difference,
    per_user_ndcg,
    rank_dense,
    rank_source,
    recall_curve,
    reranked,
    run_sources,
)
from training.evaluation import report as metric_report
from training.indexing import IdIndex, index_and_encode
from training.interactions import Encoded, Histories
from training.models.mf import MFConfig, MFResult, train_mf
from training.models.neighbours import CoOccurrence, NeighbourConfig, build_neighbours, cooccurrence, neighbours_from
from training.models.sequence import SequenceConfig, SequenceResult, left_padded, train_sequence_model
from training.ranker import RankerConfig, RankerResult, train_ranker, train_rating_model
from training.ranker_data import CandidateRows, FeatureHistory, candidate_rows
from training.ranker_features import (
    ITEM_FEATURES,
    ITEM_TIME_FEATURES,
    ITEM_STATIC_FEATURES,
    USER_FEATURES,
    category_vocabulary,
    item_static_rows,
    ranker_feature_names,
)
from training.serving_evaluation import (
    LATER_ASK_S,
    by_gap,
    last_times,
    parity,
    requests_of,
    served_ranking,
    serving_recommender,
)
from training.report_budget import ReportBudget, ablations_note, plan_ease
from training.stage_costs import StageCosts
from twostage_rec import schema
from twostage_rec.artifact import (
    ArtifactParts,
    FeatureStoreSchema,
    Manifest,
    UserHistorySchema,
    pack_model_tar,
    write_artifact,
)
from twostage_rec.candidate_features import CandidateFeatureBuilder
from twostage_rec.timelines import PointInTimeFeatures, Timeline, running_sums
from twostage_rec.features import feature_store_name
from twostage_rec.retrieval import ExactRetriever
from twostage_rec.sequence_encoder import SequenceEncoder
from twostage_rec.sources import CandidateSource
from twostage_rec.sources.assembly import FUSION
from twostage_rec.sources.merge import DEFAULT_FUSION_K, CandidateMerger, PopularItems
from twostage_rec.sources.mf import MatrixFactorizationSource
from twostage_rec.sources.neighbours import ItemNeighbourSource, NeighbourLists
from twostage_rec.sources.sequence import SequenceSource

logger = logging.getLogger(__name__)

EVENT_TIME_FEATURE = "event_time"
FEATURE_STORE_TYPES = {
    schema.ITEM_AVG_RATING: "Fractional",
    schema.ITEM_RATING_COUNT: "Integral",
    schema.ITEM_RECENT_COUNT: "Integral",
    schema.ITEM_WEEK_COUNT: "Integral",
    schema.ITEM_TREND: "Fractional",
    schema.ITEM_DAYS_SINCE_FIRST: "Fractional",
    schema.CATEGORY: "String",
    schema.PRICE: "Fractional",
    schema.YEAR: "Integral",
}
RANKER_OBJECTIVES = ("rank:ndcg", "reg:logistic")
# Recent-item kNN settings tried on validation: (alpha, backward weight) of the lists, then the
# decay of the user's recent items. On ML-1M the first is the best; the others bracket it.
NEIGHBOUR_GRID = ((0.7, 0.25), (0.5, 0.25), (0.7, 0.5), (0.9, 0.25))
DECAY_GRID = (0.6, 0.7, 0.8)
RECENT_ITEMS = 20
# Fusion weights (MF, neighbours, sequence) tried on validation Recall@100.
FUSION_GRID = ((1.0, 1.0, 1.0), (0.5, 1.0, 1.0), (0.25, 1.0, 1.0), (1.0, 1.0, 2.0), (0.5, 2.0, 1.0))
RECALL_KS = (1, 5, 10, 20, 50, 100)
RANKER_SAMPLE_FILE = "ranker_sample.csv"  # written next to metrics.json
# The ranker period's size: about this many queries in all (one per user and position), at
# most 5 positions per user. More rows cost XGBoost time linearly and helped little past it.
# With more users than this, one position per user would still grow with the users (and each
# query ranks the whole catalog): then the period is a seeded sample of this many users.
RANKER_QUERIES = 12_000
MAX_RANKER_PERIOD = 5
# Validation and test rank every item for each user, so their cost is users x items: above this
# many users both are a seeded sample (the same users in both), which keeps tuning and evaluation
# linear in the catalog instead of growing with users too. The standard error of NDCG@10 at
# 10,000 users is about 0.003, below the differences the report is read for.
EVALUATION_USERS = 10_000


@dataclass(frozen=True)
class PipelineConfig:
    mf: MFConfig = field(default_factory=MFConfig)
    sequence: SequenceConfig | None = field(default_factory=SequenceConfig)  # None: no sequence model
    neighbours: NeighbourConfig = field(default_factory=NeighbourConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    ranker_objectives: tuple[str, ...] = RANKER_OBJECTIVES  # one: no choice to make
    ranker_period: int = 0  # positions per user that teach the ranker; 0 = RANKER_QUERIES / users
    evaluation_users: int = EVALUATION_USERS  # validation and test users (a seeded sample above it)
    # The sequence model is trained on the interactions before the ranker period (early-stopped on
    # validation), which is the model the ranker period needs, then continued on the whole train
    # split for up to this many epochs (validation keeps the best): one training, not two. The
    # best continued epoch was the 1st on ML-1M and the 2nd on ML-100k (of 3 run): a third epoch
    # cost 20-30 s on ML-1M and was never kept.
    sequence_continue_epochs: int = 2
    history_length: int = 50
    baselines: bool = True  # EASE and Surprise SVD
    ablations: bool = True
    # What EASE and the ablations may cost (training/report_budget.py): what is cut is reported.
    report_budget: ReportBudget = field(default_factory=ReportBudget)
    feature_group_name: str | None = None
    user_history_group_name: str | None = None
    show_progress: bool = True
    # Where this process sits in a torchrun job (training/distributed.py); one process by default.
    distribution: Distribution = SINGLE


@dataclass
class RunResult:
    metrics: dict[str, Any]
    model_dir: Path
    tar_path: Path
    ranker_sample: Any = None  # pandas DataFrame: a few ranker-period queries' rows, as-of times and labels


@dataclass
class _Data:
    """What the stages share: indices, the split as arrays and histories, the held-out periods."""

    dataset: Dataset
    users: IdIndex
    items: IdIndex
    categories: list[str]
    train: Encoded
    train_val: Encoded
    everything: Encoded
    h_train: Histories
    h_train_val: Histories
    h_all: Histories
    val: Period
    test: Period
    features: FeatureHistory
    category_code: np.ndarray | None
    n_evaluable: int  # users with a validation and a test item (val and test may be a sample of them)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class _StageOneModels:
    """The stage-1 models fit on one slice of the data."""

    mf: MFResult
    neighbours: NeighbourLists
    sequence: SequenceResult | None
    counts: np.ndarray  # interactions per item in that slice (the popularity filler)


@dataclass(frozen=True)
class _StageOne:
    """Stage 1 as serving builds it from some models: settings shared, models per data slice."""

    recent: int
    decay: float
    weights: dict[str, float]
    names: tuple[str, ...]
    gap_cap_hours: float | None = None  # the largest gap in the ranker's training queries

    def sources(self, models: _StageOneModels) -> list[CandidateSource]:
        out: list[CandidateSource] = [
            MatrixFactorizationSource(
                models.mf.user_vectors, models.mf.item_vectors, ExactRetriever(models.mf.item_vectors)
            ),
            ItemNeighbourSource(models.neighbours, self.recent, self.decay),
        ]
        if models.sequence is not None:
            out.append(_sequence_source(models.sequence))
        return out

    def merger(self, models: _StageOneModels) -> CandidateMerger:
        return CandidateMerger(self.weights, PopularItems(_popularity_order(models.counts)), len(models.counts))

    def builder(
        self, models: _StageOneModels, data: _Data, names: Sequence[str] | None = None
    ) -> CandidateFeatureBuilder:
        vectors = models.sequence.item_vectors if models.sequence is not None else models.mf.item_vectors[:, 2:]
        return CandidateFeatureBuilder(
            names or self.names, USER_FEATURES, ITEM_FEATURES, models.neighbours, vectors, data.category_code,
            self.gap_cap_hours,
        )

    def rows(
        self,
        period: Period,
        run: SourceRun,
        models: _StageOneModels,
        data: _Data,
        names: Sequence[str] | None = None,
        without: str | None = None,
    ) -> CandidateRows:
        return candidate_rows(
            period, run, self.merger(models), self.builder(models, data, names), data.features, without
        )


def run(dataset: Dataset, out_dir: Path, config: PipelineConfig = PipelineConfig()) -> RunResult | None:
    """Train, evaluate, refit and write ``out_dir/model``, ``out_dir/model.tar.gz``; return the metrics.

    In a distributed run every rank runs the same stages (the neural ones share their batches);
    only rank 0 evaluates the baselines and ablations and writes the model: the other ranks
    return None after the last training stage, having written nothing.
    """
    if not config.distribution.is_main:  # report-only work: rank 0 does it
        config = replace(config, baselines=False, ablations=False)
    costs = StageCosts()
    clock = costs.stage
    with clock("split"):
        data = _prepare(dataset, config)
    logger.info(
        "%s: %d interactions, %d users, %d items", dataset.name, len(dataset.interactions), data.n_users, data.n_items
    )
    metrics: dict[str, Any] = {
        "dataset": dataset.name,
        "n_users": data.n_users,
        "n_items": data.n_items,
        "n_interactions": int(len(dataset.interactions)),
        "n_test_users": len(data.test),
        "n_evaluable_users": data.n_evaluable,
        "validation": {},
        "tuning": {},
    }

    # Stage-1 models on the train split, each tuned or early-stopped on validation.
    with clock("mf"):
        mf = _fit_mf(data, config, data.train, validation=data.val)
        metrics["tuning"]["mf"] = {"best_epoch": mf.best_epoch, "epochs": mf.history}
    with clock("item_neighbours"):
        neighbour_config, decay, lists = _tune_neighbours(data, config, metrics)
    sequence = early_sequence = None
    if config.sequence is not None:
        with clock("sequence"):
            early_sequence = _train_sequence(data, config, _before_ranker_period(data, config), data.val)
            sequence = _train_sequence(data, config, data.h_train, data.val, warm_start=early_sequence)
            metrics["tuning"]["sequence"] = {
                "early_best_epoch": early_sequence.best_epoch,
                "early_epochs": early_sequence.history,
                "continued_best_epoch": sequence.best_epoch,
                "continued_epochs": sequence.history,
            }
    train_models = _StageOneModels(mf, lists, sequence, _counts(data.train, data))
    with clock("baselines"):
        tuned = _tune_baselines(data, config, metrics) if config.baselines else {}
    with clock("fusion"):
        run_val = run_sources(data.val, _StageOne(RECENT_ITEMS, decay, {}, ()).sources(train_models))
        weights = _tune_fusion(data, run_val, train_models, metrics)
    names = ranker_feature_names(list(weights))
    stage = _StageOne(RECENT_ITEMS, decay, weights, names)

    # Stage 2 learns on the ranker period, with models that never saw it, and is tuned on validation.
    with clock("ranker_period_models"):
        period_rk, early_models = _ranker_period(data, config, train_models, neighbour_config, early_sequence)
    gaps = period_rk.at_time - last_times(period_rk)
    stage = replace(stage, gap_cap_hours=float(gaps.max(initial=0)) / 3600.0)
    with clock("ranker"):
        run_rk = run_sources(period_rk, stage.sources(early_models))
        rows_rk = stage.rows(period_rk, run_rk, early_models, data)
        rows_val = stage.rows(data.val, run_val, train_models, data)
        ranker, objective = _choose_ranker(rows_rk, rows_val, names, config, data, metrics)
        rating_model = train_rating_model(
            rows_rk.x,
            rows_rk.rating,
            rows_rk.query,
            config.ranker,
            names,
            valid=(rows_val.x, rows_val.rating, rows_val.query),
        )

    # Parity: serving, asked at each validation query's time, computes exactly training's rows. The
    # report is rank 0's (the refit below trains on every rank).
    main = config.distribution.is_main
    if main:
        with clock("parity"):
            parts = _artifact_parts(data, config, train_models, stage, objective, ranker, rating_model, data.h_train)
            with serving_recommender(parts, out_dir) as served_val:
                metrics["parity"] = {
                    "validation": parity(served_val, rows_val, data.val, data.users.ids, _rerank(ranker, rows_val))
                }
            _check_parity(metrics["parity"]["validation"], "validation")

    # Test, once: refit what learns from interactions on train + validation. The two-stage numbers
    # are the serving recommender's answers as of each held-out interaction.
    with clock("evaluation"):
        test_models = _refit(data, config, mf, neighbour_config, sequence, data.train_val, data.h_train_val)
        if main:
            run_test, rows_test = _test_report(data, config, stage, test_models, tuned, objective, ranker,
                                               rating_model, out_dir, metrics)
    if config.ablations:
        with clock("ablations"):
            metrics["ablations"] = _ablations(
                data,
                config,
                stage,
                objective,
                ranker.best_rounds,
                ((period_rk, run_rk, early_models, rows_rk), (data.test, run_test, test_models, rows_test)),
            )

    # The shipped model.
    with clock("refit"):
        final_models = _refit(data, config, mf, neighbour_config, sequence, data.everything, data.h_all)
        if not config.distribution.is_main:  # the last stage that trains together is done
            return None
        x, label, rating, group = _stack(rows_rk, rows_val, rows_test)
        ranker_config = replace(config.ranker, objective=objective)
        ranker_all = train_ranker(x, label, group, ranker_config, names, fixed_rounds=ranker.best_rounds)
        rating_all = train_rating_model(x, rating, group, config.ranker, names, fixed_rounds=rating_model.best_rounds)
    with clock("artifact"):
        model_dir = out_dir / "model"
        evaluation = {
            "ndcg@10": metrics["two_stage"]["ndcg@10"],
            "ndcg@10_se": metrics["two_stage"]["ndcg@10_se"],
            "hr@10": metrics["two_stage"]["hr@10"],
            "recall@100": metrics["two_stage"]["recall@100"],
            "test_users": len(data.test),
            "protocol": "temporal leave-last-out, full ranking, asked of the serving recommender as of each "
                        "held-out interaction",
        }
        parts = _artifact_parts(
            data, config, final_models, stage, objective, ranker_all, rating_all, data.h_all, evaluation
        )
        manifest = _write_model(model_dir, parts, final_models, data)
        tar_path = pack_model_tar(model_dir, out_dir / "model.tar.gz")

    metrics["ranker"] = {
        "objective": objective,
        "best_rounds": ranker.best_rounds,
        "ranker_period": _period_size(data, config),
        "training_queries": int(len(period_rk)),
        "training_rows": int(len(rows_rk.label)),
        "feature_importance": ranker_all.feature_importance,
    }
    metrics["rating_model"] = {
        "best_rounds": rating_model.best_rounds,
        "validation_rmse": _rmse(rating_model, rows_val),
    }
    metrics["model_version"] = manifest.model_version
    metrics["timings_s"] = costs.seconds
    metrics["cpu_s"] = costs.cpu_seconds
    metrics["memory_mb"] = costs.memory_mb  # peak resident memory during each stage
    return RunResult(metrics, model_dir, tar_path, ranker_sample(rows_rk, period_rk, data, names))


def ranker_sample(rows: CandidateRows, period: Period, data: _Data, names: Sequence[str], queries: int = 5) -> Any:
    """The first ``queries`` queries' ranker rows as a table: who, which candidate, the as-of time
    every feature was computed at (the held-out interaction's time), the label and the features."""
    import pandas as pd

    keep = rows.query < queries
    query = rows.query[keep]
    frame = pd.DataFrame(rows.x[keep], columns=list(names))
    items = np.concatenate([m.item_idx for m in rows.merged[:queries]]) if queries else np.empty(0, np.int64)
    frame.insert(0, "label", rows.label[keep])
    frame.insert(0, "as_of", pd.to_datetime(period.at_time[query], unit="s", utc=True))
    frame.insert(0, schema.ITEM_ID, np.asarray(data.items.ids, dtype=object)[items])
    frame.insert(0, schema.USER_ID, np.asarray(data.users.ids, dtype=object)[period.user_idx[query]])
    return frame


# --- data --------------------------------------------------------------------------------------


def _prepare(dataset: Dataset, config: PipelineConfig) -> _Data:
    from training.split import HoldOut, hold_out, tie_hash

    inter = dataset.interactions
    # Each string id is hashed once, here; the split and everything after work on integers.
    users, user_idx = index_and_encode(inter[schema.USER_ID])
    # Items nobody interacted with have untrained vectors: they would be retrieved at random.
    items, item_idx = index_and_encode(inter[schema.ITEM_ID])
    encoded = Encoded(
        user_idx,
        item_idx,
        inter[schema.RATING].to_numpy(np.float32, copy=True),
        inter[schema.TIMESTAMP].to_numpy(np.int64),
    )
    # The users' sorted-id order is the split's user order: these are leave_last_out's rows.
    ties = tie_hash(
        pd.DataFrame({schema.USER_ID: users.categorical(user_idx), schema.ITEM_ID: items.categorical(item_idx)})
    )
    split = hold_out(encoded.user_idx, encoded.timestamp, ties)
    # One gather into (user, time, tie) order; every part and prefix below is a sequential mask of it.
    in_order = encoded.take(split.order)
    train, val, test = (in_order.take(split.part == part) for part in (HoldOut.TRAIN, HoldOut.VALIDATION, HoldOut.TEST))
    if len(val) == 0:
        raise ValueError("no user has 3 or more interactions: nothing to validate or test on")
    n_users = len(users)
    train_val = train.concat(val)
    everything = train_val.concat(test)
    # Histories from rows already in (user, time, tie) order: the same histories as sorting
    # train_val and everything (a user's validation row follows their train rows, test follows
    # both), without three more sorts of every row.
    # Every row is in_order itself, which nothing else holds: no copy for h_all.
    # train is in_order's rows of part <= TRAIN already: no second gather for its histories.
    h_train = Histories.of_sorted(train, n_users)
    h_train_val = Histories.of_sorted(in_order.take(split.part <= HoldOut.VALIDATION), n_users)
    h_all = Histories.of_sorted(in_order, n_users)
    categories = category_vocabulary(dataset.items)
    # The user timeline is h_all itself; the item timeline sorts every row once by (item, time).
    data_end = int(encoded.timestamp.max()) + 1
    features = FeatureHistory(
        PointInTimeFeatures(
            Timeline(h_all.indptr, h_all.timestamps, running_sums(h_all.indptr, h_all.ratings)),
            Timeline.build(in_order.item_idx, in_order.timestamp, in_order.rating, len(items)),
            data_end,
            USER_FEATURES,
            ITEM_FEATURES,
        ),
        item_static_rows(dataset.items, items.ids, categories),
    )
    return _Data(
        dataset,
        users,
        items,
        categories,
        train,
        train_val,
        everything,
        h_train,
        h_train_val,
        h_all,
        Period.of(val, h_train, config.history_length).sample(config.evaluation_users),
        Period.of(test, h_train_val, config.history_length).sample(config.evaluation_users),
        features,
        _category_codes(features.static_items, categories),
        len(test),
    )


def _category_codes(static_items: np.ndarray, categories: list[str]) -> np.ndarray | None:
    """Each item's category code (static metadata; NaN unknown), or None without categories."""
    if not categories:
        return None
    return np.ascontiguousarray(static_items[:, ITEM_FEATURES.index(schema.CATEGORY_CODE)], dtype=np.float32)


def _counts(rows: Encoded, data: _Data) -> np.ndarray:
    return np.bincount(rows.item_idx, minlength=data.n_items)


def _popularity_order(counts: np.ndarray) -> np.ndarray:
    return np.lexsort((np.arange(len(counts)), -counts)).astype(np.int64)


# --- stage-1 models ----------------------------------------------------------------------------


def _fit_mf(
    data: _Data,
    config: PipelineConfig,
    rows: Encoded,
    validation: Period | None = None,
    fixed_epochs: int | None = None,
) -> MFResult:
    # One thread: MF is many small ops, and a second thread only waits (measured: 10-15x slower
    # per epoch with 2 threads while the cores were shared).
    with _torch_threads(1):
        return train_mf(
            data.n_users,
            data.n_items,
            rows.user_idx,
            rows.item_idx,
            rows.rating,
            replace(config.mf, show_progress=config.show_progress),
            validation=None if validation is None else (validation.user_idx, validation.target),
            fixed_epochs=fixed_epochs,
            distribution=config.distribution,
        )


def _tune_neighbours(
    data: _Data, config: PipelineConfig, metrics: dict[str, Any]
) -> tuple[NeighbourConfig, float, NeighbourLists]:
    """Lists and recent-item decay with the best validation NDCG@10 of the kNN baseline."""
    tried: dict[str, float] = {}
    base_decay = DECAY_GRID[len(DECAY_GRID) // 2]
    best: tuple[float, NeighbourConfig, float, NeighbourLists] | None = None
    best_at = len(NEIGHBOUR_GRID)
    # Alpha only re-normalises the counts: the grid runs grouped by backward weight, one count per
    # group (one at a time: at 1M items a count is GBs); a tie still goes to the earlier setting.
    counts: tuple[float, CoOccurrence] | None = None
    for at, (alpha, backward) in sorted(enumerate(NEIGHBOUR_GRID), key=lambda e: e[1][1]):
        candidate = replace(config.neighbours, alpha=alpha, backward_weight=backward)
        if counts is None or counts[0] != backward:
            counts = None  # free the last count before the next is built
            counts = (backward, cooccurrence(data.h_train, data.n_items, candidate))
        lists = neighbours_from(counts[1], candidate)
        score = _ndcg(rank_source(data.val, ItemNeighbourSource(lists, RECENT_ITEMS, base_decay)), data.val)
        tried[f"alpha={alpha},backward={backward},decay={base_decay}"] = score
        if best is None or score > best[0] or (score == best[0] and at < best_at):
            best, best_at = (score, candidate, base_decay, lists), at
    counts = None
    assert best is not None
    for decay in DECAY_GRID:
        if decay != base_decay:
            score = _ndcg(rank_source(data.val, ItemNeighbourSource(best[3], RECENT_ITEMS, decay)), data.val)
            tried[f"alpha={best[1].alpha},backward={best[1].backward_weight},decay={decay}"] = score
            if score > best[0]:
                best = (score, best[1], decay, best[3])
    metrics["tuning"]["item_neighbours"] = tried
    metrics["validation"]["item_knn_recent"] = best[0]
    logger.info(
        "item neighbours: alpha=%s backward=%s decay=%s (validation NDCG@10 %.4f)",
        best[1].alpha,
        best[1].backward_weight,
        best[2],
        best[0],
    )
    return best[1], best[2], best[3]


def _train_sequence(
    data: _Data,
    config: PipelineConfig,
    histories: Histories,
    validation: Period,
    warm_start: SequenceResult | None = None,
) -> SequenceResult:
    """The sequence model on ``histories``, early-stopped on ``validation`` NDCG@10; continued from
    ``warm_start`` for at most ``sequence_continue_epochs`` when given."""
    assert config.sequence is not None
    seq_config = replace(config.sequence, max_length=config.history_length, show_progress=config.show_progress)
    if warm_start is not None:
        seq_config = replace(
            seq_config, epochs=config.sequence_continue_epochs, patience=config.sequence_continue_epochs
        )
    sequences = [validation.histories.user_items(int(u)) for u in validation.user_idx]

    def validate(model: Any) -> float:
        device = next(model.parameters()).device
        vectors = [
            model.user_vectors(torch.from_numpy(left_padded(sequences[a : a + 512], seq_config.max_length)).to(device))
            .cpu()
            .numpy()
            for a in range(0, len(sequences), 512)
        ]
        user_vectors, items = np.vstack(vectors), model.item_vectors.detach().cpu().numpy()
        row = {int(u): r for r, u in enumerate(validation.user_idx)}
        return _ndcg(
            rank_dense(validation, lambda users: user_vectors[[row[int(u)] for u in users]] @ items.T), validation
        )

    label = "sequence model" if warm_start is None else "sequence model, continued on the whole train split"
    return train_sequence_model(
        histories,
        data.n_items,
        seq_config,
        validate=validate,
        warm_start=warm_start,
        label=label,
        distribution=config.distribution,
    )


def _refit(
    data: _Data,
    config: PipelineConfig,
    mf: MFResult,
    neighbour_config: NeighbourConfig,
    sequence: SequenceResult | None,
    rows: Encoded,
    histories: Histories,
) -> _StageOneModels:
    """MF and the neighbour lists refit on ``rows`` with the chosen settings; the sequence model
    is kept (it reads the newer interactions from the history at request time)."""
    refit = _fit_mf(data, config, rows, fixed_epochs=mf.best_epoch)
    return _StageOneModels(
        refit, build_neighbours(histories, data.n_items, neighbour_config), sequence, _counts(rows, data)
    )


def _period_size(data: _Data, config: PipelineConfig) -> int:
    if config.ranker_period > 0:
        return config.ranker_period
    return int(np.clip(round(RANKER_QUERIES / max(1, data.n_users)), 1, MAX_RANKER_PERIOD))


def _before_ranker_period(data: _Data, config: PipelineConfig) -> Histories:
    """The train split without the ranker period (each user's last few training interactions)."""
    size = _period_size(data, config)
    lengths = data.h_train.lengths
    return data.h_train.first(np.where(lengths - size >= 1, lengths - size, lengths))


def _ranker_period(
    data: _Data,
    config: PipelineConfig,
    train_models: _StageOneModels,
    neighbour_config: NeighbourConfig,
    early_sequence: SequenceResult | None,
) -> tuple[Period, _StageOneModels]:
    """The ranker period's queries and the stage-1 models fit on the interactions before it (MF
    and the neighbour lists refit with the settings chosen on validation; the sequence model is
    the one trained on exactly those interactions)."""
    period = Period.positions(data.h_train, _period_size(data, config), config.history_length)
    if data.n_users > RANKER_QUERIES:  # one position per user: a sample of the users
        period = period.sample(RANKER_QUERIES)
    early = _before_ranker_period(data, config)
    rows = early.encoded()
    mf = _fit_mf(data, config, rows, fixed_epochs=train_models.mf.best_epoch)
    lists = build_neighbours(early, data.n_items, neighbour_config)
    logger.info(
        "ranker period: %d queries (%d per user), models fit on %d earlier interactions",
        len(period),
        _period_size(data, config),
        len(rows),
    )
    return period, _StageOneModels(mf, lists, early_sequence, _counts(rows, data))


def _sequence_source(sequence: SequenceResult) -> SequenceSource:
    encoder = SequenceEncoder(sequence.graph, sequence.spec, sequence.item_vectors)
    return SequenceSource(encoder, sequence.item_vectors, ExactRetriever(sequence.item_vectors))


# --- baselines ---------------------------------------------------------------------------------


def _tune_baselines(data: _Data, config: PipelineConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """EASE's lambda (on the items the report's budget allows) and SVD's settings on validation;
    what the test refit needs."""
    plan = plan_ease(data.n_items, config.report_budget)
    tuned: dict[str, Any] = {"ease_plan": plan}
    if plan.note:
        logger.info("EASE: %s", plan.note)
    if plan.runs:
        items = None
        if plan.tuning_items is not None:
            items = np.sort(_popularity_order(_counts(data.train, data))[: plan.tuning_items])
        gram = ease.item_gram(data.h_train, data.n_items, items)
        scores = {}
        for lam in ease.DEFAULT_LAMBDAS:
            scorer = ease.fit_ease(gram, lam).scorer(data.h_train)
            scores[lam] = _ndcg(rank_dense(data.val, scorer), data.val)
            del scorer  # its dense matrix, before the next fit
        del gram
        tuned["ease"] = max(scores, key=lambda k: scores[k])
        metrics["tuning"]["ease"] = {f"lambda={k:g}": v for k, v in scores.items()}
        metrics["validation"]["ease"] = scores[tuned["ease"]]
    scores_svd = {}
    for candidate in svd.DEFAULT_GRID:
        model = svd.fit_svd(data.train, data.n_users, data.n_items, data.dataset.rating_scale, candidate)
        scores_svd[candidate] = _ndcg(rank_dense(data.val, model.scorer()), data.val)
    tuned["svd"] = max(scores_svd, key=lambda k: scores_svd[k])
    metrics["tuning"]["svd"] = {f"factors={c.n_factors},reg={c.reg_all}": v for c, v in scores_svd.items()}
    metrics["validation"]["svd"] = scores_svd[tuned["svd"]]
    return tuned


def _test_baselines(
    data: _Data,
    config: PipelineConfig,
    models: _StageOneModels,
    tuned: dict[str, Any],
    stage: _StageOne,
    metrics: dict[str, Any],
) -> dict[str, np.ndarray]:
    """Every baseline's test metrics into ``metrics``; returns their rankings."""
    test, n_items = data.test, data.n_items
    counts = models.counts.astype(np.float64)
    mf = models.mf
    rankings = {
        "popularity": rank_dense(test, lambda u: np.broadcast_to(counts, (len(u), n_items))),
        "mf": rank_dense(test, lambda u: mf.user_vectors[u] @ mf.item_vectors.T),
        "item_knn_recent": rank_source(test, ItemNeighbourSource(models.neighbours, stage.recent, stage.decay)),
    }
    if models.sequence is not None:
        rankings["sasrec"] = rank_source(test, _sequence_source(models.sequence))
    if config.baselines:
        if "ease" in tuned:
            ease_model = ease.fit_ease(ease.item_gram(data.h_train_val, n_items), tuned["ease"])
            rankings["ease"] = rank_dense(test, ease_model.scorer(data.h_train_val))
            del ease_model  # its dense matrix, before SVD's fit
        else:
            metrics["ease"] = {"skipped": tuned["ease_plan"].note}
        model = svd.fit_svd(data.train_val, data.n_users, n_items, data.dataset.rating_scale, tuned["svd"])
        rankings["svd"] = rank_dense(test, model.scorer())
    for name, ranking in rankings.items():
        metrics[name] = metric_report(ranking, test.target, n_items)
    if "ease" in rankings and tuned["ease_plan"].note:
        metrics["ease"]["note"] = tuned["ease_plan"].note
    return rankings


# --- stage 1 merge -----------------------------------------------------------------------------


def _tune_fusion(data: _Data, run_val: SourceRun, models: _StageOneModels, metrics: dict[str, Any]) -> dict[str, float]:
    """Fusion weights (MF, neighbours, sequence) with the best validation Recall@100 of the merge."""
    names = list(run_val.results)
    popular = PopularItems(_popularity_order(models.counts))
    tried: dict[str, float] = {}
    best_weights, best_recall = None, -1.0
    for grid in FUSION_GRID:
        weights = {
            n: w
            for n, w in zip((schema.SOURCE_MF, schema.SOURCE_NEIGHBOURS, schema.SOURCE_SEQUENCE), grid)
            if n in names
        }
        merger = CandidateMerger(weights, popular, data.n_items)
        recall = recall_curve(candidates_ranking(run_val.merged(merger)), data.val.target, (DEPTH,))[DEPTH]
        tried[",".join(f"{n}={w:g}" for n, w in weights.items())] = recall
        if recall > best_recall:
            best_weights, best_recall = weights, recall
    assert best_weights is not None
    metrics["tuning"]["fusion"] = tried
    metrics["validation"]["merged_recall@100"] = best_recall
    logger.info("fusion weights %s (validation Recall@100 %.4f)", best_weights, best_recall)
    return best_weights


# --- stage 2 -----------------------------------------------------------------------------------


def _test_report(
    data: _Data,
    config: PipelineConfig,
    stage: _StageOne,
    test_models: _StageOneModels,
    tuned: dict[str, Any],
    objective: str,
    ranker: RankerResult,
    rating_model: RankerResult,
    out_dir: Path,
    metrics: dict[str, Any],
) -> tuple[SourceRun, CandidateRows]:
    """The test report into ``metrics``: the two-stage model as the serving recommender answers as of
    each held-out interaction (and 90 days later), parity, by real gap, every baseline, stage 1."""
    run_test = run_sources(data.test, stage.sources(test_models))
    rows_test = stage.rows(data.test, run_test, test_models, data)
    parts = _artifact_parts(data, config, test_models, stage, objective, ranker, rating_model, data.h_train_val)
    with serving_recommender(parts, out_dir) as served_test:
        two_stage = served_ranking(served_test, requests_of(data.test, data.users.ids))
        later = served_ranking(served_test, requests_of(data.test, data.users.ids, LATER_ASK_S))
        metrics["parity"]["test"] = parity(served_test, rows_test, data.test, data.users.ids,
                                           _rerank(ranker, rows_test))
    _check_parity(metrics["parity"]["test"], "test")
    metrics["two_stage"] = metric_report(two_stage, data.test.target, data.n_items)
    metrics["two_stage_asked_90_days_later"] = metric_report(later, data.test.target, data.n_items)
    metrics["by_gap"] = by_gap(
        {"two_stage": two_stage, **{name: run_test.ranking(name) for name in run_test.results}}, data.test
    )
    rankings = _test_baselines(data, config, test_models, tuned, stage, metrics)
    mine = per_user_ndcg(two_stage, data.test.target)
    metrics["two_stage_vs"] = {
        name: {f"ndcg@10_{k}": v for k, v in paired_difference(mine, per_user_ndcg(r, data.test.target)).items()}
        for name, r in rankings.items()
    }
    _stage_one_report(data, run_test, rows_test, metrics)
    return run_test, rows_test


def _choose_ranker(
    rows: CandidateRows,
    val: CandidateRows,
    names: Sequence[str],
    config: PipelineConfig,
    data: _Data,
    metrics: dict[str, Any],
) -> tuple[RankerResult, str]:
    """Each objective trained on the ranker period and early-stopped on validation; the one with
    the best validation NDCG@10 (full ranking: a user whose item stage 1 missed scores 0) wins."""
    scores: dict[str, float] = {}
    fits: dict[str, RankerResult] = {}
    for objective in config.ranker_objectives:
        fit = train_ranker(
            rows.x,
            rows.label,
            rows.query,
            replace(config.ranker, objective=objective),
            names,
            valid=(val.x, val.label, val.query),
        )
        scores[objective] = _ndcg(_rerank(fit, val), data.val)
        fits[objective] = fit
    chosen = max(scores, key=lambda o: scores[o])
    metrics["tuning"]["ranker_objective"] = scores
    metrics["validation"]["two_stage"] = scores[chosen]
    metrics["validation"]["stage1_fusion"] = _ndcg(candidates_ranking(val.merged), data.val)
    logger.info("ranker objective %s (validation NDCG@10 %s)", chosen, scores)
    return fits[chosen], chosen


def _rerank(ranker: RankerResult, rows: CandidateRows) -> np.ndarray:
    return reranked(rows.merged, ranker.booster.inplace_predict(rows.x))


def _check_parity(found: dict[str, Any], period: str) -> None:
    """Log loudly when serving does not compute training's rows: the report would not be what
    the endpoint serves (a bug of ours; the parity test fails on it)."""
    n = found["queries"]
    if found["same_features"] == found["same_candidates"] == found["same_top10"] == n:
        logger.info("parity on %d %s queries: serving's ranker inputs equal training's (max difference %.2g)",
                    n, period, found["max_abs_feature_difference"])
        return
    logger.error("PARITY BROKEN on %s: of %d queries %d have training's candidates, %d its features, %d its top 10 "
                 "(max difference %.3g)", period, n, found["same_candidates"], found["same_features"],
                 found["same_top10"], found["max_abs_feature_difference"])


def _ablations(
    data: _Data,
    config: PipelineConfig,
    stage: _StageOne,
    objective: str,
    rounds: int,
    periods: tuple[
        tuple[Period, SourceRun, _StageOneModels, CandidateRows],
        tuple[Period, SourceRun, _StageOneModels, CandidateRows],
    ],
) -> dict[str, Any]:
    """Test metrics of the two-stage model retrained (same objective and rounds) without each
    source, and without the candidate-vs-history features. Reported only; nothing is chosen here.
    Above the report's budget only ``{"skipped": why}``."""
    skipped = ablations_note(len(data.dataset.interactions), data.n_items, config.report_budget)
    if skipped:
        logger.info("ablations skipped: %s", skipped)
        return {"skipped": skipped}
    (period_rk, run_rk, early, full_rk), (test, run_test, test_models, full_test) = periods
    ranker_config = replace(config.ranker, objective=objective)
    variants: dict[str, tuple[str | None, tuple[str, ...]]] = {
        f"without_{source}": (source, ranker_feature_names([s for s in stage.weights if s != source]))
        for source in stage.weights
    }
    variants["without_history_features"] = (None, ranker_feature_names(list(stage.weights), history_features=False))
    # The item statistics that change with time (counts over 7 and 30 days, trend, age, all-time
    # count and mean): what a model serving long after its training reads stale.
    variants["without_item_time_statistics"] = (None, tuple(n for n in stage.names if n not in ITEM_TIME_FEATURES))
    out: dict[str, Any] = {}
    for name, (without, names) in variants.items():
        if without is None:
            # Same candidates, fewer features: the full rows' columns, not a second feature build.
            columns = [stage.names.index(n) for n in names]
            train_rows = replace(full_rk, x=full_rk.x[:, columns])
            test_rows = replace(full_test, x=full_test.x[:, columns])
        else:
            train_rows = stage.rows(period_rk, run_rk, early, data, names, without)
            test_rows = stage.rows(test, run_test, test_models, data, names, without)
        fit = train_ranker(train_rows.x, train_rows.label, train_rows.query, ranker_config, names, fixed_rounds=rounds)
        out[name] = metric_report(_rerank(fit, test_rows), test.target, data.n_items)
    return out


def _stage_one_report(data: _Data, run: SourceRun, rows: CandidateRows, metrics: dict[str, Any]) -> None:
    target = data.test.target
    rankings = {name: run.ranking(name) for name in run.results}
    rankings["merged"] = candidates_ranking(rows.merged)
    metrics["stage1"] = {
        "recall@100": {name: recall_curve(r, target, (DEPTH,))[DEPTH] for name, r in rankings.items()},
        "recall_curves": {name: recall_curve(r, target, RECALL_KS) for name, r in rankings.items()},
    }


def _stack(*periods: CandidateRows) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Several periods' rows as one training set: (x, label, rating, query group)."""
    offsets = np.cumsum([0] + [int(r.query.max(initial=-1)) + 1 for r in periods])
    return (
        np.vstack([r.x for r in periods]),
        np.concatenate([r.label for r in periods]),
        np.concatenate([r.rating for r in periods]),
        np.concatenate([r.query + offset for r, offset in zip(periods, offsets)]),
    )


def _rmse(model: RankerResult, rows: CandidateRows) -> float:
    """RMSE of the predicted rating on the chosen validation items (the rating model never trained on them)."""
    chosen = rows.label > 0
    if not chosen.any():
        return float("nan")
    predicted = model.booster.inplace_predict(rows.x[chosen])
    return float(np.sqrt(np.mean((predicted - rows.rating[chosen]) ** 2)))


# --- the artifact ------------------------------------------------------------------------------


def _write_model(model_dir: Path, parts: ArtifactParts, models: _StageOneModels, data: _Data) -> Manifest:
    """The shipped artifact: ``parts`` with the ANN indexes their catalog size calls for."""
    return write_artifact(with_ann_index(parts, sequence_queries=_sequence_queries(models.sequence, data)), model_dir)


def _artifact_parts(
    data: _Data,
    config: PipelineConfig,
    models: _StageOneModels,
    stage: _StageOne,
    objective: str,
    ranker: RankerResult,
    rating_model: RankerResult,
    seen: Histories,
    evaluation: dict[str, Any] | None = None,
) -> ArtifactParts:
    """The artifact of these models. ``seen`` is what each user has done (every interaction for the
    shipped model; the interactions before a held-out period for the report's models, whose item
    timelines still hold every interaction: what the endpoint would know at each as_of)."""
    dataset = data.dataset
    point_in_time = data.features.point_in_time
    data_end = point_in_time.data_end
    version = f"{dataset.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    group = config.feature_group_name or default_feature_group_name(dataset.name)
    # Feature Store holds what does not change with time; the rest is computed at each request's as_of.
    fs_types = {feature_store_name(f): FEATURE_STORE_TYPES[feature_store_name(f)] for f in ITEM_STATIC_FEATURES}
    sources: dict[str, dict[str, float]] = {name: {"weight": w} for name, w in stage.weights.items()}
    sources[schema.SOURCE_NEIGHBOURS].update({"recent": stage.recent, "decay": stage.decay})
    sources[FUSION] = {"k": DEFAULT_FUSION_K}
    seq = models.sequence
    manifest = Manifest(
        model_version=version,
        item_id_field=dataset.item_id_field,
        n_users=data.n_users,
        n_items=data.n_items,
        factor_dim=int(models.mf.user_vectors.shape[1]),
        rating_min=float(dataset.rating_scale[0]),
        rating_max=float(dataset.rating_scale[1]),
        ranker_objective=objective,
        ranker_features=list(stage.names),
        user_feature_names=list(USER_FEATURES),
        item_feature_names=list(ITEM_FEATURES),
        categories=list(data.categories),
        feature_store=FeatureStoreSchema(
            feature_group_name=group,
            record_identifier_name=dataset.item_id_field,
            event_time_feature_name=EVENT_TIME_FEATURE,
            feature_types=fs_types,
        ),
        retrieval_objective=models.mf.config.objective,
        history_length=config.history_length,
        data_end=data_end,
        gap_cap_hours=stage.gap_cap_hours,
        user_history=UserHistorySchema(
            feature_group_name=config.user_history_group_name
            or default_feature_group_name(dataset.name, "user-history")
        ),
        sources=sources,
        sequence_model=None if seq is None else seq.spec.to_manifest(),
        dataset=dataset.name,
        extra={
            "mf_best_epoch": models.mf.best_epoch,
            "ranker_rounds": ranker.best_rounds,
            **({} if evaluation is None else {"evaluation": evaluation}),
        },
    )
    return ArtifactParts(
        manifest=manifest,
        user_ids=data.users.ids,
        item_ids=data.items.ids,
        user_factors=models.mf.user_vectors,
        item_factors=models.mf.item_vectors,
        seen_indptr=seen.indptr,
        seen_indices=seen.items.astype(np.int32),
        seen_timestamps=seen.timestamps,
        seen_rating_sums=running_sums(seen.indptr, seen.ratings),
        item_timeline_indptr=point_in_time.items.indptr,
        item_timeline_timestamps=point_in_time.items.timestamps,
        item_timeline_rating_sums=point_in_time.items.rating_sums,
        item_features=data.features.item_rows(np.arange(data.n_items), np.full(data.n_items, data_end)),
        popular_items=_popularity_order(models.counts).astype(np.int32),
        neighbour_indptr=models.neighbours.indptr,
        neighbour_items=models.neighbours.items,
        neighbour_scores=models.neighbours.scores,
        ranker_bytes=bytes(ranker.booster.save_raw("ubj")),
        rating_model_bytes=bytes(rating_model.booster.save_raw("ubj")),
        feature_importance=ranker.feature_importance,
        sequence_graph=None if seq is None else seq.graph,
        sequence_item_vectors=None if seq is None else seq.item_vectors,
    )


def _sequence_queries(sequence: SequenceResult | None, data: _Data) -> Callable[[np.ndarray], np.ndarray] | None:
    """Users' sequence vectors from their latest histories: the queries an index is tuned on.

    A function of the user indices, so only the sample the index is tuned on is encoded (encoding
    every user would grow with the users for ~500 rows used). None without a sequence model.
    """
    if sequence is None:
        return None
    encoder = SequenceEncoder(sequence.graph, sequence.spec, sequence.item_vectors)

    def encode(users: np.ndarray) -> np.ndarray:
        out = np.zeros((len(users), sequence.spec.dim), dtype=np.float32)
        has = np.flatnonzero(data.h_all.lengths[users] > 0)
        for start in range(0, len(has), 256):
            rows = has[start : start + 256]
            out[rows] = encoder.encode([data.h_all.user_items(int(u)) for u in users[rows]])
        return out

    return encode


def default_feature_group_name(dataset_name: str, kind: str = "items") -> str:
    """Feature group names allow letters, digits and hyphens, up to 64 characters."""
    return (re.sub(r"[^A-Za-z0-9-]+", "-", f"twostage-{dataset_name}-{kind}").strip("-"))[:64]


# --- helpers -----------------------------------------------------------------------------------


def _ndcg(ranking: np.ndarray, period: Period) -> float:
    return ndcg_at_10(ranking, period.target) if len(period) else float("nan")


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
