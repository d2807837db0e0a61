"""The models the benchmarks run on, cached under ``~/.cache/twostage-rec/bench``.

MovieLens models come from the real training pipeline (``python -m training run``). The large
catalogs are synthetic and written directly with the artifact writer: random factors, random
features and a tiny XGBoost ranker have the serving cost of a real model of that shape, and the
training pipeline would take far too long at a million items.

MovieLens models are keyed by the committed git trees of ``code/`` and ``training/``, so a new
commit touching either retrains (uncommitted edits do not: pass ``--retrain``); synthetic ones by
the artifact writer's source and :data:`SYNTHETIC_VERSION`. ``--retrain`` rebuilds regardless.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import numpy as np

REPO: Final = Path(__file__).resolve().parent.parent
EMBEDDING_DIM: Final = 64
SYNTHETIC_USERS: Final = 50_000
SEEN_PER_USER: Final = 50
SYNTHETIC_VERSION: Final = 1  # bump when write_synthetic_model changes what it writes


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
    """The model directory of ``python -m training run --dataset DATASET``, trained once per key."""
    out = cache_root() / f"{dataset}-{source_key()}"
    model_dir = out / "model"
    if retrain or not (model_dir / "model_manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        print(f"[bench] training {dataset} into {out} (cached for later runs)", flush=True)
        started = time.monotonic()
        command = [sys.executable, "-m", "training", "run", "--dataset", dataset, "--out", str(out), "--no-progress"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "code"), str(REPO)])}
        log = out.parent / f"{out.name}.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as handle:
            status = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        if status != 0:
            raise RuntimeError(f"training {dataset} failed with status {status}; see {log}")
        print(f"[bench] trained {dataset} in {time.monotonic() - started:.0f} s", flush=True)
    return readable(model_dir)


def synthetic_model(n_items: int, n_users: int = SYNTHETIC_USERS, retrain: bool = False) -> Path:
    """A random model with ``n_items`` items, dim-64 factors and the ML-1M feature layout."""
    writer = hashlib.sha256((REPO / "code" / "twostage_rec" / "artifact.py").read_bytes()).hexdigest()[:8]
    model_dir = cache_root() / f"synthetic-{n_items}x{n_users}-{writer}v{SYNTHETIC_VERSION}" / "model"
    if retrain or not (model_dir / "model_manifest.json").is_file():
        print(f"[bench] writing a synthetic model with {n_items:,} items into {model_dir}", flush=True)
        write_synthetic_model(model_dir, n_items, n_users)
    return readable(model_dir)


def write_synthetic_model(model_dir: Path, n_items: int, n_users: int, seed: int = 0) -> None:
    """Write a servable random model with the artifact writer (seeded, so rebuilds are identical)."""
    import xgboost as xgb

    from twostage_rec import schema
    from twostage_rec.artifact import ArtifactParts, FeatureStoreSchema, Manifest, write_artifact

    rng = np.random.default_rng(seed)
    user_features = [schema.USER_MEAN_RATING, schema.USER_RATING_COUNT]
    fs_types = {
        schema.ITEM_AVG_RATING: "Fractional", schema.ITEM_RATING_COUNT: "Integral",
        schema.ITEM_RECENT_COUNT: "Integral", schema.ITEM_DAYS_SINCE_FIRST: "Fractional",
        schema.CATEGORY: "String", schema.PRICE: "Fractional", schema.YEAR: "Integral",
    }
    item_features = [schema.CATEGORY_CODE if n == schema.CATEGORY else n for n in fs_types]
    ranker_features = [schema.MF_SCORE, *user_features, *item_features]
    categories = [f"category-{c}" for c in range(20)]

    def folded(n: int, ones_col: int) -> np.ndarray:
        # Users are [b_u, 1, e_u], items [1, b_i, e_i]: the constant 1 meets the other side's bias.
        factors = rng.standard_normal((n, EMBEDDING_DIM + 2), dtype=np.float32) * np.float32(0.1)
        factors[:, ones_col] = 1.0
        return factors

    counts = np.floor(rng.lognormal(2.0, 1.5, n_items)).astype(np.float32)
    items = np.column_stack([
        rng.uniform(1, 5, n_items), counts, np.floor(counts * rng.uniform(0, 0.2, n_items)),
        rng.uniform(0, 5000, n_items), rng.integers(0, len(categories), n_items),
        rng.uniform(1, 100, n_items), rng.integers(1950, 2025, n_items),
    ]).astype(np.float32)
    users = np.column_stack([rng.uniform(1, 5, n_users), rng.integers(1, 500, n_users)]).astype(np.float32)
    seen = np.sort(rng.integers(0, n_items, (n_users, SEEN_PER_USER)), axis=1)  # duplicates are harmless

    x = rng.uniform(0, 5, (5000, len(ranker_features))).astype(np.float32)

    def booster(label: np.ndarray, rounds: int, depth: int) -> bytes:
        params = {"objective": "reg:squarederror", "max_depth": depth, "eta": 0.1, "nthread": 1, "seed": seed}
        trained = xgb.train(params, xgb.DMatrix(x, label=label, feature_names=ranker_features), rounds)
        return bytes(trained.save_raw("ubj"))

    manifest = Manifest(
        model_version=f"synthetic-{n_items}", item_id_field="item_id", n_users=n_users, n_items=n_items,
        factor_dim=EMBEDDING_DIM + 2, rating_min=1.0, rating_max=5.0, ranker_objective="reg:squarederror",
        ranker_features=ranker_features, user_feature_names=user_features, item_feature_names=item_features,
        categories=categories, dataset="synthetic",
        feature_store=FeatureStoreSchema(f"synthetic-{n_items}-items", "item_id", "event_time", fs_types),
    )
    write_artifact(
        ArtifactParts(
            manifest=manifest,
            user_ids=[f"u{u}" for u in range(n_users)],
            item_ids=[f"i{i}" for i in range(n_items)],
            user_factors=folded(n_users, ones_col=1),
            item_factors=folded(n_items, ones_col=0),
            seen_indptr=np.arange(0, (n_users + 1) * SEEN_PER_USER, SEEN_PER_USER, dtype=np.int64),
            seen_indices=seen.ravel().astype(np.int32),
            user_features=users,
            item_features=items,
            popular_items=np.argsort(-counts, kind="stable")[:1000].astype(np.int32),
            ranker_bytes=booster(x[:, 0] + 0.3 * x[:, 3] + rng.normal(0, 0.5, len(x)), rounds=100, depth=6),
            rating_model_bytes=booster(np.clip(x[:, 3] + rng.normal(0, 0.5, len(x)), 1, 5), rounds=50, depth=4),
        ),
        model_dir,
    )


def readable(model_dir: Path) -> Path:
    """Let the image's unprivileged user read the model (the writer's staging folder is 0700)."""
    model_dir.chmod(0o755)
    for path in model_dir.iterdir():
        path.chmod(0o644)
    return model_dir
