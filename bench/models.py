"""The models the benchmarks run on, cached under ``~/.cache/twostage-rec/bench``.

MovieLens models come from the real training pipeline (``python -m training run``). The large
catalogs are synthetic, written directly with the artifact writer in the shape of a trained ML-1M
model: MF factors with the structure of trained BPR factors
(:class:`training.ann_index.SyntheticFactors`), each user's last 50 items in time order, 50
neighbours per item, a sequence encoder of ML-1M's shape with random weights, the full ranker
feature list, all three candidate sources and, from ``ANN_MIN_ITEMS`` items on, IVF indexes of
both the MF and the sequence item vectors. That has the serving cost of a real model of that
size; the training pipeline would take far too long at a million items.

With ``history_mean`` the users have the Amazon Reviews shape instead (:func:`sparse_histories`):
many users, each with a few interactions (geometric lengths, ``history_mean`` on average) of
popularity-skewed items, every one of them in the history. That writer is vectorised (no Python
loop per user), so it writes 10M users; only the id table hashes each id once.

MovieLens models are keyed by the committed git trees of ``code/`` and ``training/`` and by the
artifact format, so a new commit touching either retrains (uncommitted edits do not: pass
``--retrain``); synthetic ones by the sources the writer depends on and :data:`SYNTHETIC_VERSION`.
``--retrain`` rebuilds regardless.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from twostage_rec import schema
from twostage_rec.artifact import (
    FORMAT_VERSION,
    ArtifactParts,
    FeatureStoreSchema,
    Manifest,
    UserHistorySchema,
    write_artifact,
)
from twostage_rec.features import feature_store_name
from twostage_rec.sequence_encoder import EncoderSpec, SequenceEncoder
from twostage_rec.settings import Settings
from twostage_rec.sources.assembly import FUSION
from twostage_rec.sources.merge import DEFAULT_FUSION_K

if TYPE_CHECKING:
    from training.ann_index import SyntheticFactors

REPO: Final = Path(__file__).resolve().parent.parent
ML_1M: Final = "ml-1m"
ML_100K: Final = "ml-100k"
EMBEDDING_DIM: Final = 64
SYNTHETIC_USERS: Final = 50_000
HISTORY_LENGTH: Final = 50  # the pipeline's --history-length default, and the encoder's max_length
NEIGHBOURS_PER_ITEM: Final = 50
# SyntheticFactors draws each user's seen items from their own top 2,000, a scan of the whole
# catalog per user (~30 ms at 1M items): this many distinct MF users are drawn, and the others
# reuse their vectors and seen items. Every user gets a history of their own.
DISTINCT_MF_USERS: Final = 2_000
# The sparse (Amazon-shaped) models do not use those users' seen items: fewer distinct vectors
# keep the writer's catalog scans short at 1M items. Still more than the IVF tuning sample.
SPARSE_MF_USERS: Final = 600
# Popularity skew of the sparse histories: item rank = n_items * U**POPULARITY_SKEW (U uniform),
# so the most popular 1% of the items takes about a fifth of the interactions.
POPULARITY_SKEW: Final = 3.0
# ML-1M's sequence model: training.models.sequence.SequenceConfig's defaults (importing it needs
# torch). Its item vectors are the MF embedding in another basis, so the dims must match.
SEQUENCE_DIM: Final = EMBEDDING_DIM
SEQUENCE_BLOCKS: Final = 2
SEQUENCE_HEADS: Final = 1
N_CATEGORIES: Final = 20
HISTORY_END: Final = 1_735_689_600  # 2025-01-01, fixed so rebuilds are identical
HISTORY_SPAN_S: Final = 2 * 365 * 86_400  # the histories fall in the two years before HISTORY_END
SYNTHETIC_VERSION: Final = 5  # bump when write_synthetic_model changes what it writes
# What the synthetic writer's output depends on besides this file (whose changes bump
# SYNTHETIC_VERSION): part of its cache key.
_WRITER_SOURCES: Final = (
    "code/twostage_rec/artifact.py",
    "code/twostage_rec/ann.py",
    "code/twostage_rec/sequence_encoder.py",
    "training/ann_index.py",
    "training/models/sequence.py",
    "training/ranker_features.py",
)
# The training run's report-only stages: the shipped model does not depend on them.
_REPORT_ONLY: Final = ("--no-baselines", "--no-ablations")
# Dense source -> its IVF index's entry in manifest.extra (training.ann_index.with_ann_index).
INDEX_ENTRIES: Final = {schema.SOURCE_MF: "ann", schema.SOURCE_SEQUENCE: "sequence_ann"}


def synthetic_name(n_items: int) -> str:
    """The report's name of a synthetic catalog: ``synthetic-2k``, ``synthetic-100k``, ``synthetic-1M``."""
    return f"synthetic-{n_items // 10**6}M" if n_items % 10**6 == 0 else f"synthetic-{n_items // 1000}k"


def cache_root() -> Path:
    """``$TWOSTAGE_CACHE_DIR/bench`` if set, else ``~/.cache/twostage-rec/bench``."""
    configured = os.environ.get("TWOSTAGE_CACHE_DIR")
    return (Path(configured) if configured else Path.home() / ".cache" / "twostage-rec") / "bench"


def source_key() -> str:
    """12 hex digits naming the committed serving and training code (``nogit`` outside a checkout)."""
    command = ["git", "rev-parse", "HEAD:code", "HEAD:training"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    trees = result.stdout if result.returncode == 0 else "nogit"
    return hashlib.sha256(trees.encode()).hexdigest()[:12]


def movielens_model(dataset: str, retrain: bool = False) -> Path:
    """The model directory of ``python -m training run --dataset DATASET``, trained once per key.

    The baselines and ablations only add to the training report, so they are skipped.
    """
    # The format is part of the key: uncommitted code keeps its commit's key, and a model cached
    # in an older format would not load.
    out = cache_root() / f"{dataset}-{source_key()}-v{FORMAT_VERSION}"
    model_dir = out / "model"
    if retrain or not (model_dir / "model_manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        print(f"[bench] training {dataset} into {out} (15-20 min; cached for later runs)", flush=True)
        started = time.monotonic()
        command = [sys.executable, "-m", "training", "run", "--dataset", dataset, "--out", str(out), "--no-progress",
                   *_REPORT_ONLY]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "code"), str(REPO)])}
        log = out.parent / f"{out.name}.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as handle:
            status = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        if status != 0:
            raise RuntimeError(f"training {dataset} failed with status {status}; see {log}")
        print(f"[bench] trained {dataset} in {time.monotonic() - started:.0f} s", flush=True)
    return readable(model_dir)


def synthetic_model(
    n_items: int, n_users: int = SYNTHETIC_USERS, retrain: bool = False, history_mean: float | None = None
) -> Path:
    """A random model with ``n_items`` items in the shape of a trained ML-1M model, or with
    ``history_mean`` in the Amazon shape (see the module)."""
    writer = hashlib.sha256()
    for name in _WRITER_SOURCES:
        writer.update((REPO / name).read_bytes())
    shape = "synthetic" if history_mean is None else f"sparse{history_mean:g}"
    key = f"{shape}-{n_items}x{n_users}-{writer.hexdigest()[:8]}v{SYNTHETIC_VERSION}"
    model_dir = cache_root() / key / "model"
    if retrain or not (model_dir / "model_manifest.json").is_file():
        print(f"[bench] writing a synthetic model with {n_items:,} items and {n_users:,} users into {model_dir}",
              flush=True)
        started = time.monotonic()
        manifest = write_synthetic_model(model_dir, n_items, n_users, history_mean=history_mean)
        indexes = packaged_indexes(manifest.extra)
        print(f"[bench] written in {time.monotonic() - started:.0f} s; IVF indexes: "
              + (", ".join(f"{s} recall@100 {x.get('recall_at_100')}" for s, x in indexes.items()) or "none"),
              flush=True)
    return readable(model_dir)


def packaged_indexes(extra: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each dense source's IVF index as packaging recorded it (cells, probes, measured recall)."""
    return {source: dict(extra[key]) for source, key in INDEX_ENTRIES.items() if isinstance(extra.get(key), dict)}


def write_synthetic_model(
    model_dir: Path,
    n_items: int,
    n_users: int,
    seed: int = 0,
    ann_min_items: int | None = None,
    history_mean: float | None = None,
) -> Manifest:
    """Write a servable random model with the artifact writer (seeded, so rebuilds are identical).

    ``ann_min_items`` is the catalog size from which the IVF indexes are built (default: serving's
    ``ANN_MIN_ITEMS``). ``history_mean`` switches to the Amazon shape (:func:`sparse_histories`);
    ``None`` keeps ML-1M's (full histories). Returns the manifest written.
    """
    # Only the writer needs training's modules (pandas) and xgboost: the report imports this module too.
    from training.ann_index import SyntheticFactors, with_ann_index
    from training.ranker_features import ITEM_FEATURES, USER_FEATURES, ranker_feature_names

    rng = np.random.default_rng(seed)
    distinct = DISTINCT_MF_USERS if history_mean is None else SPARSE_MF_USERS
    mf = SyntheticFactors.generate(n_items, min(n_users, distinct), EMBEDDING_DIM, seed)
    base_user = np.arange(n_users) % len(mf.user_factors)
    if history_mean is None:
        history, seen = _histories(mf, base_user, n_items, rng)
    else:
        history, seen = sparse_histories(n_users, n_items, history_mean, rng)
    graph, spec, sequence_vectors = _sequence_model(mf.item_factors, rng)
    neighbours = _neighbour_lists(n_items, rng)
    items = _item_features(ITEM_FEATURES, n_items, rng)
    counts = items[:, ITEM_FEATURES.index(schema.ITEM_RATING_COUNT)]
    ranker_features = list(ranker_feature_names([schema.SOURCE_MF, schema.SOURCE_NEIGHBOURS, schema.SOURCE_SEQUENCE]))
    name = f"synthetic-{n_items}"
    manifest = Manifest(
        model_version=name, item_id_field="item_id", n_users=n_users, n_items=n_items,
        factor_dim=EMBEDDING_DIM + 2, rating_min=1.0, rating_max=5.0, ranker_objective="reg:squarederror",
        ranker_features=ranker_features, user_feature_names=list(USER_FEATURES), item_feature_names=list(ITEM_FEATURES),
        categories=[f"category-{c}" for c in range(N_CATEGORIES)], dataset="synthetic", data_end=HISTORY_END,
        feature_store=FeatureStoreSchema(f"{name}-items", "item_id", "event_time",
                                         _feature_store_types(ITEM_FEATURES, items)),
        history_length=HISTORY_LENGTH,
        user_history=UserHistorySchema(f"{name}-user-history"),
        sources={  # every source weighs the same in the fusion, as in the tiny test model
            schema.SOURCE_MF: {"weight": 1.0},
            schema.SOURCE_NEIGHBOURS: {"weight": 1.0, "recent": 20, "decay": 0.7},
            schema.SOURCE_SEQUENCE: {"weight": 1.0},
            FUSION: {"k": DEFAULT_FUSION_K},
        },
        sequence_model=spec.to_manifest(),
    )
    parts = ArtifactParts(
        manifest=manifest,
        user_ids=[f"u{u}" for u in range(n_users)],
        item_ids=[f"i{i}" for i in range(n_items)],
        user_factors=mf.user_factors[base_user],
        item_factors=mf.item_factors,
        **_timeline_parts(seen, n_items, rng),
        item_features=items,
        popular_items=np.argsort(-counts, kind="stable")[:1000].astype(np.int32),
        neighbour_indptr=neighbours.indptr,
        neighbour_items=neighbours.items,
        neighbour_scores=neighbours.values,
        ranker_bytes=_booster(ranker_features, rng, rounds=100, depth=6, seed=seed),
        rating_model_bytes=_booster(ranker_features, rng, rounds=50, depth=4, seed=seed),
        sequence_graph=graph,
        sequence_item_vectors=sequence_vectors,
    )
    threshold = Settings().ann_min_items if ann_min_items is None else ann_min_items

    def queries(users: np.ndarray) -> np.ndarray:
        # The sequence index is tuned on what serving asks it: the encoder's vectors of the
        # histories, of the tuning sample only (encoding 10M histories would take an hour).
        return _encode_histories(graph, spec, sequence_vectors, history, users)

    return write_artifact(with_ann_index(parts, min_items=threshold, sequence_queries=queries, seed=seed), model_dir)


def readable(model_dir: Path) -> Path:
    """Let the image's unprivileged user read the model (the writer's staging folder is 0700)."""
    model_dir.chmod(0o755)
    for path in model_dir.iterdir():
        path.chmod(0o644)
    return model_dir


@dataclass(frozen=True)
class _Lists:
    """One list of items per row (a user or an item) as CSR arrays, the artifact's layout."""

    indptr: np.ndarray  # int64 (rows + 1,)
    items: np.ndarray  # int32
    values: np.ndarray | None = None  # aligned with items: timestamps (int64) or scores (float32)


def _timeline_parts(seen: _Lists, n_items: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The artifact's user and item timelines of ``seen`` (time-ordered, with timestamps), with
    random whole-star ratings."""
    from twostage_rec.timelines import Timeline, running_sums

    assert seen.values is not None
    ratings = rng.integers(1, 6, len(seen.items)).astype(np.float64)
    items = Timeline.build(seen.items, seen.values, ratings, n_items)
    return {
        "seen_indptr": seen.indptr,
        "seen_indices": seen.items,
        "seen_timestamps": seen.values,
        "seen_rating_sums": running_sums(seen.indptr, ratings),
        "item_timeline_indptr": items.indptr,
        "item_timeline_timestamps": items.timestamps,
        "item_timeline_rating_sums": items.rating_sums,
    }


def _csr(lists: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    return indptr, np.concatenate(lists).astype(np.int32)


def _histories(
    mf: SyntheticFactors, base_user: np.ndarray, n_items: int, rng: np.random.Generator
) -> tuple[_Lists, _Lists]:
    """(history, seen) of every user: the last ``HISTORY_LENGTH`` items with timestamps, and every
    item seen in time order with timestamps (the history is seen's last items).

    A history is the MF user's seen items in a random order, topped up with random items (then
    seen too) when there are fewer: a trained model's histories hold only items the user had, and
    a full history is what the history-aware stages cost the most on. The other seen items come
    before the history, a span earlier.
    """
    histories, older = [], []
    for base in base_user:
        pool = mf.seen_indices[mf.seen_indptr[base] : mf.seen_indptr[base + 1]]
        drawn = np.concatenate([rng.permutation(pool), rng.integers(0, n_items, HISTORY_LENGTH)])
        _, first = np.unique(drawn, return_index=True)
        history = drawn[np.sort(first)][:HISTORY_LENGTH]
        histories.append(history)
        older.append(np.setdiff1d(pool, history))
    indptr, items = _csr(histories)
    times = np.sort(rng.integers(HISTORY_END - HISTORY_SPAN_S, HISTORY_END, (len(histories), HISTORY_LENGTH)), axis=1)
    present = np.arange(HISTORY_LENGTH)[None, :] < np.diff(indptr)[:, None]
    history = _Lists(indptr, items, times[present].astype(np.int64))
    seen_indptr, seen_items = _csr([np.concatenate([o, h]) for o, h in zip(older, histories)])
    old_times = HISTORY_END - 2 * HISTORY_SPAN_S + np.sort(rng.integers(0, HISTORY_SPAN_S, len(seen_items)))
    seen_times = old_times.astype(np.int64)
    # Each user's history times go to the end of their seen row.
    lengths = np.diff(indptr)
    ends = seen_indptr[1:]
    slots = np.repeat(ends - lengths, lengths) + (np.arange(len(items)) - np.repeat(indptr[:-1], lengths))
    seen_times[slots] = history.values  # the older slots keep their (sorted, earlier) times
    return history, _Lists(seen_indptr, seen_items, seen_times)


def sparse_histories(
    n_users: int, n_items: int, history_mean: float, rng: np.random.Generator
) -> tuple[_Lists, _Lists]:
    """(history, seen) in the Amazon shape, vectorised: geometric lengths of mean ``history_mean``
    (at least 1, at most ``HISTORY_LENGTH``), popularity-skewed items, duplicates within a user
    dropped; every interaction is in the history, so seen is the history.

    Sorting 10M users' interactions is a few ``np.unique`` / ``argsort`` calls over ~50M int64.
    """
    if history_mean < 1:
        raise ValueError(f"history_mean {history_mean} < 1: every user has at least one interaction")
    lengths = np.minimum(rng.geometric(1.0 / history_mean, n_users), HISTORY_LENGTH)
    owner = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    popularity = rng.permutation(n_items)  # rank -> item: the popular items are not the low ids
    rank = (n_items * rng.random(len(owner)) ** POPULARITY_SKEW).astype(np.int64)
    # One key per (user, item): np.unique drops a user's repeats and sorts by user, then item.
    key = np.unique(owner * n_items + popularity[np.minimum(rank, n_items - 1)])
    owner, items = np.divmod(key, n_items)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=n_users), out=indptr[1:])
    times = rng.integers(HISTORY_END - HISTORY_SPAN_S, HISTORY_END, len(key))
    by_time = np.argsort(owner * HISTORY_SPAN_S + (times - (HISTORY_END - HISTORY_SPAN_S)), kind="stable")
    history = _Lists(indptr, items[by_time].astype(np.int32), times[by_time].astype(np.int64))
    return history, history


def _neighbour_lists(n_items: int, rng: np.random.Generator) -> _Lists:
    """``NEIGHBOURS_PER_ITEM`` random neighbours of each item (never the item itself), scores decreasing."""
    shape = (n_items, NEIGHBOURS_PER_ITEM)
    items = (np.arange(n_items)[:, None] + rng.integers(1, max(2, n_items), shape)) % n_items
    scores = -np.sort(-rng.random(shape, dtype=np.float32), axis=1)
    indptr = np.arange(n_items + 1, dtype=np.int64) * NEIGHBOURS_PER_ITEM
    return _Lists(indptr, items.ravel().astype(np.int32), scores.ravel())


def _sequence_model(mf_items: np.ndarray, rng: np.random.Generator) -> tuple[bytes, EncoderSpec, np.ndarray]:
    """(ONNX graph, shape, item vectors) of a random encoder of ML-1M's shape.

    Weights as PyTorch initialises them, exported as training exports a trained model. The item
    vectors are the MF embedding in a random basis: a trained model's item vectors have the
    catalog's structure too (a decaying spectrum, clusters of similar items), which is what an IVF
    index and its recall depend on; plain Gaussian vectors have none.
    """
    import torch

    from training.models.sequence import SASRec, SequenceConfig, to_onnx

    torch.manual_seed(int(rng.integers(2**31)))
    config = SequenceConfig(dim=SEQUENCE_DIM, n_blocks=SEQUENCE_BLOCKS, n_heads=SEQUENCE_HEADS,
                            max_length=HISTORY_LENGTH)
    graph = to_onnx(SASRec(1, config).eval())  # the graph does not hold the item vectors
    rotation = np.linalg.qr(rng.standard_normal((SEQUENCE_DIM, SEQUENCE_DIM)))[0].astype(np.float32)
    spec = EncoderSpec(SEQUENCE_DIM, SEQUENCE_BLOCKS, SEQUENCE_HEADS, HISTORY_LENGTH)
    return graph, spec, np.ascontiguousarray(mf_items[:, 2:] @ rotation, dtype=np.float32)


def _encode_histories(
    graph: bytes, spec: EncoderSpec, item_vectors: np.ndarray, history: _Lists, users: np.ndarray
) -> np.ndarray:
    """float32 (len(users), dim): the sequence vector of each of ``users``, the queries the sequence
    index is tuned on."""
    encoder = SequenceEncoder(graph, spec, item_vectors)
    out = np.empty((len(users), spec.dim), dtype=np.float32)
    for start in range(0, len(users), 256):
        chunk = users[start : start + 256]
        out[start : start + len(chunk)] = encoder.encode(
            [history.items[history.indptr[u] : history.indptr[u + 1]] for u in chunk]
        )
    return out


def _item_features(names: Sequence[str], n_items: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (n_items, len(names)): random values of each item feature, with the missing values
    a trained snapshot has (no average rating without ratings, no trend without recent ones)."""
    count = np.floor(rng.lognormal(2.0, 1.5, n_items))
    recent = np.floor(count * rng.uniform(0, 0.2, n_items))
    week = np.floor(recent * rng.uniform(0, 0.4, n_items))
    with np.errstate(invalid="ignore", divide="ignore"):
        trend = np.where(recent > 0, (week / 7.0) / (recent / 30.0), np.nan)
    columns = {
        schema.ITEM_AVG_RATING: np.where(count > 0, rng.uniform(1, 5, n_items), np.nan),
        schema.ITEM_RATING_COUNT: count,
        schema.ITEM_RECENT_COUNT: recent,
        schema.ITEM_WEEK_COUNT: week,
        schema.ITEM_TREND: trend,
        schema.ITEM_DAYS_SINCE_FIRST: rng.uniform(0, 5000, n_items),
        schema.CATEGORY_CODE: rng.integers(0, N_CATEGORIES, n_items),
        schema.PRICE: rng.uniform(1, 100, n_items),
        schema.YEAR: rng.integers(1950, 2025, n_items),
    }
    return np.column_stack([columns[name] for name in names]).astype(np.float32)


def _feature_store_types(names: Sequence[str], items: np.ndarray) -> dict[str, str]:
    """Each item feature's Feature Store type, from its values: the category travels as its label."""
    def kind(name: str, values: np.ndarray) -> str:
        if name == schema.CATEGORY_CODE:
            return "String"
        finite = values[np.isfinite(values)]
        return "Integral" if np.array_equal(finite, np.floor(finite)) else "Fractional"

    return {feature_store_name(n): kind(n, items[:, c]) for c, n in enumerate(names)}


def _booster(names: Sequence[str], rng: np.random.Generator, rounds: int, depth: int, seed: int) -> bytes:
    """An XGBoost regressor over ``names`` fit to a random linear target on the rating scale: its
    trees split on every feature, and missing values (NaN, as for a candidate a source did not
    list) take their own branch."""
    import xgboost as xgb

    x = rng.uniform(0, 5, (5000, len(names))).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    linear = np.nan_to_num(x) @ rng.normal(0, 1, len(names))
    label = np.clip(3.0 + (linear - linear.mean()) / linear.std() + rng.normal(0, 0.5, len(x)), 1.0, 5.0)
    params = {"objective": "reg:squarederror", "max_depth": depth, "eta": 0.1, "nthread": 1, "seed": seed}
    trained = xgb.train(params, xgb.DMatrix(x, label=label, feature_names=list(names)), rounds)
    return bytes(trained.save_raw("ubj"))
