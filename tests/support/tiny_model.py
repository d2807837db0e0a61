"""A tiny, hand-checkable model directory written by the real artifact writer.

3 users x 6 items, embedding dim 2 (factor width 4). Item i has category "even"/"odd" by parity
and price 10 * (i + 1). The ranker is an XGBoost regression fit to ``mf_score``, so its order
follows the MF order; tests can reason about results by hand. Stage 1 has all three sources:
MF, item neighbours (hand-written lists below) and a small seeded sequence model; with
``num_candidates`` >= 5 every unseen item is a candidate, so the final order is the MF order.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import xgboost as xgb

from twostage_rec import schema
from twostage_rec.artifact import (
    ArtifactParts,
    FeatureStoreSchema,
    Manifest,
    ModelArtifact,
    UserHistorySchema,
    write_artifact,
)
from twostage_rec.candidate_features import CandidateFeatureBuilder
from twostage_rec.sequence_encoder import EncoderSpec
from twostage_rec.sources.assembly import neighbour_lists
from twostage_rec.timelines import running_sums

USER_IDS = ["alice", "bob", "carol"]
ITEM_IDS = ["i0", "i1", "i2", "i3", "i4", "i5"]
CATEGORIES = ["even", "odd"]
USER_FEATURES = [schema.USER_MEAN_RATING, schema.USER_RATING_COUNT]
ITEM_FEATURES = [schema.ITEM_AVG_RATING, schema.ITEM_RATING_COUNT, schema.CATEGORY_CODE, schema.PRICE]
RANKER_FEATURES = [schema.MF_SCORE, *USER_FEATURES, *ITEM_FEATURES]
# Every candidate feature, then the user and item ones: the full ranker matrix's columns.
CANDIDATE_NAMES = [*schema.CANDIDATE_FEATURES, *USER_FEATURES, *ITEM_FEATURES]

# user [b_u, 1, e_u], item [1, b_i, e_i]
USER_FACTORS = np.array(
    [
        [0.0, 1.0, 1.0, 0.0],  # alice likes dimension 0
        [0.0, 1.0, 0.0, 1.0],  # bob likes dimension 1
        [0.5, 1.0, 0.5, 0.5],  # carol a bit of both
    ],
    dtype=np.float32,
)
ITEM_FACTORS = np.array(
    [
        [1.0, 0.0, 5.0, 0.0],  # i0: dim 0 strong
        [1.0, 0.0, 4.0, 1.0],  # i1
        [1.0, 0.0, 3.0, 2.0],  # i2
        [1.0, 0.0, 2.0, 3.0],  # i3
        [1.0, 0.0, 1.0, 4.0],  # i4
        [1.0, 0.0, 0.0, 5.0],  # i5: dim 1 strong
    ],
    dtype=np.float32,
)
# Seen items: alice saw i0, bob saw i5, carol saw nothing.
SEEN = {0: [0], 1: [5], 2: []}
POPULAR = [2, 3, 1, 4, 0, 5]
# Ordered history (item, timestamp, rating): the seen items, in time.
HISTORY = {0: [(0, 100, 4.0)], 1: [(5, 200, 3.0)], 2: []}
DATA_END = 201
# Every item's ratings by other users, all at time 50: item i has 100 - 10 i ratings of 4 - 0.1 i, so
# its average rating and rating count are those at any as_of after 50.
BACKGROUND_TIME = 50
# Item neighbours, best first: i0 <-> i1 (0.9), i0 <-> i2 (0.5), i4 <-> i5 (0.8).
NEIGHBOURS = {0: [(1, 0.9), (2, 0.5)], 1: [(0, 0.9)], 2: [(0, 0.5)], 3: [], 4: [(5, 0.8)], 5: [(4, 0.8)]}
SEQUENCE_DIM = 4
SOURCES = {
    schema.SOURCE_MF: {"weight": 1.0},
    schema.SOURCE_NEIGHBOURS: {"weight": 1.0, "recent": 20, "decay": 0.7},
    schema.SOURCE_SEQUENCE: {"weight": 1.0},
    "fusion": {"k": 60.0},
}


@functools.lru_cache(maxsize=None)
def sequence_model(
    seed: int = 0, dim: int = SEQUENCE_DIM, n_items: int = 6, max_length: int = 4
) -> tuple[bytes, dict, np.ndarray]:
    """A seeded random 1-block, 1-head sequence encoder: (ONNX graph, manifest shape, item vectors)."""
    import torch

    from training.models.sequence import SASRec, SequenceConfig, to_onnx

    torch.manual_seed(seed)
    config = SequenceConfig(dim=dim, n_blocks=1, n_heads=1, max_length=max_length)
    model = SASRec(n_items, config).eval()
    with torch.no_grad():  # non-trivial weights everywhere (the layer norms stay the identity)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.5)
    spec = EncoderSpec(dim, 1, 1, max_length)
    rng = np.random.default_rng(seed)
    return to_onnx(model), spec.to_manifest(), rng.normal(0, 1, size=(n_items, dim)).astype(np.float32)


def mf_scores(user_idx: int) -> np.ndarray:
    return ITEM_FACTORS @ USER_FACTORS[user_idx]


def feature_builder(artifact: ModelArtifact) -> CandidateFeatureBuilder:
    """The candidate-feature builder over ``CANDIDATE_NAMES``, with each item's category code by parity."""
    return CandidateFeatureBuilder(
        CANDIDATE_NAMES,
        USER_FEATURES,
        ITEM_FEATURES,
        neighbour_lists(artifact),
        artifact.sequence_item_vectors,
        np.array([i % 2 for i in range(len(ITEM_IDS))], dtype=np.float32),
    )


def build_tiny_model(model_dir: Path, feature_group_name: str = "tiny-items", model_version: str = "tiny-1") -> Path:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 6, size=(400, len(RANKER_FEATURES))).astype(np.float32)
    booster = xgb.train(
        {"objective": "reg:squarederror", "max_depth": 3, "eta": 0.3, "nthread": 1, "seed": 0},
        xgb.DMatrix(x, label=x[:, 0], feature_names=RANKER_FEATURES),
        num_boost_round=60,
    )
    # The rating model: a rating that falls with the item's price (column 6), kept in [1, 5].
    rating_booster = xgb.train(
        {"objective": "reg:squarederror", "max_depth": 2, "eta": 0.3, "nthread": 1, "seed": 0},
        xgb.DMatrix(x, label=np.clip(5.0 - x[:, 6], 1.0, 5.0), feature_names=RANKER_FEATURES),
        num_boost_round=30,
    )
    history = [row for u in range(len(USER_IDS)) for row in HISTORY[u]]
    item_counts = [100 - 10 * i for i in range(len(ITEM_IDS))]
    neighbour_indptr = np.cumsum([0] + [len(NEIGHBOURS[i]) for i in range(len(ITEM_IDS))])
    neighbours = [pair for i in range(len(ITEM_IDS)) for pair in NEIGHBOURS[i]]
    sequence_graph, sequence_layout, sequence_vectors = sequence_model()
    indptr = np.cumsum([0] + [len(HISTORY[u]) for u in range(len(USER_IDS))])
    indices = np.array([i for i, _, _ in history], dtype=np.int32)
    item_features = np.array(
        [[4.0 - 0.1 * i, 100.0 - 10 * i, float(i % 2), 10.0 * (i + 1)] for i in range(len(ITEM_IDS))],
        dtype=np.float32,
    )
    manifest = Manifest(
        model_version=model_version,
        item_id_field="item_id",
        n_users=len(USER_IDS),
        n_items=len(ITEM_IDS),
        factor_dim=USER_FACTORS.shape[1],
        rating_min=1.0,
        rating_max=5.0,
        ranker_objective="reg:squarederror",
        ranker_features=RANKER_FEATURES,
        user_feature_names=USER_FEATURES,
        item_feature_names=ITEM_FEATURES,
        categories=CATEGORIES,
        feature_store=FeatureStoreSchema(
            feature_group_name=feature_group_name,
            record_identifier_name="item_id",
            event_time_feature_name="event_time",
            feature_types={
                schema.ITEM_AVG_RATING: "Fractional",
                schema.ITEM_RATING_COUNT: "Integral",
                schema.CATEGORY: "String",
                schema.PRICE: "Fractional",
            },
        ),
        dataset="tiny",
        history_length=50,
        data_end=DATA_END,
        user_history=UserHistorySchema(feature_group_name=feature_group_name.replace("items", "user-history")),
        sources=SOURCES,
        sequence_model=sequence_layout,
    )
    write_artifact(
        ArtifactParts(
            manifest=manifest,
            user_ids=USER_IDS,
            item_ids=ITEM_IDS,
            user_factors=USER_FACTORS,
            item_factors=ITEM_FACTORS,
            seen_indptr=indptr.astype(np.int64),
            seen_indices=indices,
            seen_timestamps=np.array([t for _, t, _ in history], dtype=np.int64),
            seen_rating_sums=running_sums(indptr, np.array([r for _, _, r in history])),
            item_timeline_indptr=np.cumsum([0, *item_counts]).astype(np.int64),
            item_timeline_timestamps=np.full(sum(item_counts), BACKGROUND_TIME, dtype=np.int64),
            item_timeline_rating_sums=np.concatenate(
                [np.cumsum(np.full(n, 4.0 - 0.1 * i)) for i, n in enumerate(item_counts)]
            ),
            item_features=item_features,
            popular_items=np.array(POPULAR, dtype=np.int32),
            neighbour_indptr=neighbour_indptr.astype(np.int64),
            neighbour_items=np.array([i for i, _ in neighbours], dtype=np.int32),
            neighbour_scores=np.array([s for _, s in neighbours], dtype=np.float32),
            sequence_graph=sequence_graph,
            sequence_item_vectors=sequence_vectors,
            ranker_bytes=bytes(booster.save_raw("ubj")),
            rating_model_bytes=bytes(rating_booster.save_raw("ubj")),
        ),
        model_dir,
    )
    return model_dir
