"""In-process benchmarks: the handler called directly in this process, no HTTP, no model server.

Each request goes through ``predict_fn`` + ``output_fn`` (JSON decode, recommend, JSON encode),
exactly what a model-server worker runs; the recommender's own per-stage timings come back in
the answer: history (the user's recent items), retrieval (every candidate source and the merge),
features, ranking and their total.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from bench.models import packaged_indexes
from bench.stats import summarize
from twostage_rec import schema
from twostage_rec.allocator import keep_heap_pages
from twostage_rec.artifact import ModelArtifact, load_artifact
from twostage_rec.content_types import JSON
from twostage_rec.features import make_feature_source
from twostage_rec.handler import RawRequest, RecommendationService, output_fn, predict_fn
from twostage_rec.recommender import TwoStageRecommender
from twostage_rec.retrieval import AnnRetriever, make_retriever
from twostage_rec.settings import Settings

STAGES: Final = ("history", "retrieval", "features", "ranking", "total")
WARMUP: Final = 50
REGION: Final = "us-east-1"


def random_users(user_ids: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` users drawn with replacement, the same for every benchmark that passes the same seed."""
    rng = random.Random(seed)
    return [rng.choice(user_ids) for _ in range(n)]


def single_body(user_id: str) -> bytes:
    return json.dumps({"user_id": user_id}).encode()


def batch_bodies(users: Sequence[str], size: int) -> list[bytes]:
    """Consecutive groups of ``size`` users, each one ``{"instances": [...]}`` body."""
    groups = [users[i : i + size] for i in range(0, len(users) - size + 1, size)]
    return [json.dumps({"instances": [{"user_id": u} for u in group]}).encode() for group in groups]


def service(artifact: ModelArtifact, settings: Settings | None = None) -> tuple[RecommendationService, Any]:
    """A handler service over ``artifact`` and the feature source it uses (for cache statistics),
    with the allocator set as a serving worker sets it (``settings.malloc_keep_mb``)."""
    settings = settings or Settings()
    keep_heap_pages(settings.malloc_keep_mb << 20)
    source = make_feature_source(artifact, settings)
    return RecommendationService(TwoStageRecommender(artifact, settings, feature_source=source), settings), source


def time_handler(svc: RecommendationService, bodies: Sequence[bytes]) -> dict[str, Any]:
    """Run each body through the handler; summarize wall time and the recommender's stage timings."""
    for body in bodies[:WARMUP]:
        output_fn(predict_fn(RawRequest(body), svc), JSON)
    wall: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    degraded = 0
    for body in bodies:
        started = time.perf_counter()
        prediction = predict_fn(RawRequest(body), svc)
        output_fn(prediction, JSON)
        wall.append((time.perf_counter() - started) * 1000.0)
        answer = prediction.answers[0]  # a batch shares one set of timings
        degraded += answer.degraded
        for stage in STAGES:
            stages[stage].append(answer.timings_ms[stage])
    return {
        "requests": len(bodies),
        "handler_ms": summarize(wall).to_json(),
        "stages_ms": {s: summarize(v).to_json() for s, v in stages.items()},
        "degraded": degraded,
    }


def stage_latency(model_dir: Path, n_requests: int, seed: int = 0) -> dict[str, Any]:
    """Per-stage latency over ``n_requests`` random users with the embedded feature source,
    with the model's shape and the retriever each dense source uses."""
    artifact = load_artifact(model_dir, verify_checksums=False)
    svc, _ = service(artifact)
    m = artifact.manifest
    result = time_handler(svc, [single_body(u) for u in random_users(artifact.user_ids, n_requests, seed)])
    sources = [s for s in m.sources if s in schema.SOURCES]  # the manifest also holds the fusion's settings
    shape = {"n_items": m.n_items, "n_users": m.n_users, "factor_dim": m.factor_dim, "sources": sources}
    return {"model": m.model_version, **shape, "retrievers": retrievers(artifact, Settings()), **result}


def retrievers(artifact: ModelArtifact, settings: Settings) -> dict[str, dict[str, Any]]:
    """Per dense source: ``ivf`` or ``exact`` as serving picks it, and the index packaging built, if any.

    Serving uses an index only from ``ANN_MIN_ITEMS`` items on and when the recall@100 packaging
    measured reaches ``ANN_MIN_RECALL``; ``make_retriever`` makes that choice, here as in serving.
    """
    packaged = packaged_indexes(artifact.manifest.extra)
    dense = {
        schema.SOURCE_MF: (artifact.item_factors, artifact.ann_index),
        schema.SOURCE_SEQUENCE: (artifact.sequence_item_vectors, artifact.sequence_ann_index),
    }
    out: dict[str, dict[str, Any]] = {}
    for source, (vectors, index) in dense.items():
        if source in artifact.manifest.sources and vectors is not None:
            chosen = make_retriever(vectors, index, packaged.get(source), settings, source)
            out[source] = {"retriever": "ivf" if isinstance(chosen, AnnRetriever) else "exact",
                           "index": packaged.get(source), "ann_min_recall": settings.ann_min_recall}
    return out


def batch_cost(model_dir: Path, sizes: Sequence[int], users_per_size: int, seed: int = 0) -> dict[str, Any]:
    """Per-user handler time (p50 and p99 over requests, divided by the batch size) of
    ``{"instances": [...]}`` batches against single requests."""
    artifact = load_artifact(model_dir, verify_checksums=False)
    svc, _ = service(artifact)
    return per_user_cost(svc, random_users(artifact.user_ids, users_per_size, seed), (1, *sizes))


def per_user_cost(svc: RecommendationService, users: Sequence[str], sizes: Sequence[int]) -> dict[str, Any]:
    """Per batch size (1 = single requests): requests, per-user handler p50 and p99 (the request's
    time divided by the size) and minor page faults per request (warm-up requests included)."""
    out: dict[str, Any] = {}
    for size in sizes:
        bodies = [single_body(u) for u in users] if size == 1 else batch_bodies(users, size)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        timed = time_handler(svc, bodies)["handler_ms"]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        out[str(size)] = {"requests": len(bodies), "per_user_p50_ms": timed["p50"] / size,
                          "per_user_p99_ms": timed["p99"] / size,
                          "faults_per_request": faults / (len(bodies) + min(len(bodies), WARMUP))}
    return out


@contextlib.contextmanager
def local_feature_store(artifact: ModelArtifact) -> Iterator[str]:
    """The local Feature Store server with the artifact's item feature group created and ingested."""
    from local_test.feature_store.testing import FeatureStoreServer, make_clients
    from training.feature_store import create_item_feature_group, ingest_items

    # boto3 signs every call: the local server accepts any credentials, but there must be some.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    with FeatureStoreServer() as server:
        sagemaker, runtime = make_clients(server.endpoint_url, REGION)
        create_item_feature_group(sagemaker, artifact)
        ingest_items(runtime, artifact, show_progress=False)
        yield server.endpoint_url


def feature_sources(model_dir: Path, n_requests: int, seed: int = 0) -> dict[str, Any]:
    """The same users with the embedded snapshot, Feature Store, and the cache in front of it."""
    artifact = load_artifact(model_dir, verify_checksums=False)
    bodies = [single_body(u) for u in random_users(artifact.user_ids, n_requests, seed)]
    out: dict[str, Any] = {"embedded": time_handler(service(artifact)[0], bodies)}
    started = time.monotonic()
    with local_feature_store(artifact) as endpoint_url:
        out["ingest_s"] = round(time.monotonic() - started, 1)
        for kind in ("featurestore", "cached"):
            settings = Settings(
                feature_source=kind,  # type: ignore[arg-type]
                feature_group_name=artifact.manifest.feature_store.feature_group_name,
                region=REGION,
                feature_store_endpoint_url=endpoint_url,
            )
            svc, source = service(artifact, settings)
            out[kind] = time_handler(svc, bodies)
            if kind == "cached":
                out[kind]["cache_hit_rate"] = round(source.hits / max(1, source.hits + source.misses), 4)
    return out
