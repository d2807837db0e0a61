"""The ANN index at packaging time: build it for large catalogs, tune it, measure its recall.

The recall stored in the manifest is measured with the serving code itself: for a sample of users,
the approximate top 100 unseen items (:class:`AnnRetriever`) against the exact top 100
(:class:`ExactRetriever`). Serving uses the index only if that recall reaches ``ANN_MIN_RECALL``.

    OMP_NUM_THREADS=1 python -m training.ann_index --n-items 1000000   # benchmark, prints JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from twostage_rec.ann import REFERENCE_DEPTH, IvfIndex
from twostage_rec.artifact import ANN_CENTROIDS, ANN_ITEM_IDX, ANN_LIST_OFFSETS, ANN_VECTORS, ArtifactParts
from twostage_rec.retrieval import AnnRetriever, ExactRetriever, Retriever
from twostage_rec.settings import Settings

# The largest base probe count tried, as a share of the cells: serving scans up to half the
# cells for users with deep masks, and a larger base would mostly measure the exact fallback.
_MAX_PROBE_SHARE = 0.25
# Tune a little above the serving bound: the recall is an estimate from a user sample (its
# standard error is ~0.002 for 500 users).
_RECALL_MARGIN = 0.005


def with_ann_index(
    parts: ArtifactParts,
    min_items: int | None = None,
    target_recall: float | None = None,
    sample_users: int = 500,
    seed: int = 0,
    sequence_queries: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
) -> ArtifactParts:
    """``parts`` plus IVF indexes and their ``manifest.extra`` entries (parameters, measured recall)
    when the catalog has at least ``min_items`` items (default: serving's ``ANN_MIN_ITEMS``
    default); ``parts`` unchanged otherwise.

    The MF index is tuned on a sample of the users' MF vectors (their seen items masked). A model
    with a sequence model gets a second index over its item vectors, tuned on
    ``sequence_queries`` (user vectors from the encoder; rows align with the users), or a function
    from the sampled user indices to their vectors (the encoder then reads only the sample).
    """
    defaults = Settings()
    if len(parts.item_factors) < (defaults.ann_min_items if min_items is None else min_items):
        return parts
    target = defaults.ann_min_recall + _RECALL_MARGIN if target_recall is None else target_recall
    rng = np.random.default_rng(seed)
    n_users = len(parts.user_factors)
    users = np.sort(rng.choice(n_users, min(sample_users, n_users), replace=False))
    blocked = [np.asarray(parts.seen_indices[parts.seen_indptr[u] : parts.seen_indptr[u + 1]], np.int64) for u in users]
    index, meta = build_ann_index(parts.item_factors, np.asarray(parts.user_factors[users]), blocked, target, seed)
    extra = {**parts.manifest.extra, "ann": meta}
    sequence_index = None
    if parts.sequence_item_vectors is not None and sequence_queries is not None:
        queries = sequence_queries(users) if callable(sequence_queries) else sequence_queries[users]
        sequence_index, extra["sequence_ann"] = build_ann_index(
            parts.sequence_item_vectors, np.asarray(queries), blocked, target, seed
        )
    manifest = replace(parts.manifest, extra=extra)
    return replace(parts, manifest=manifest, ann_index=index, sequence_ann_index=sequence_index)


def build_ann_index(
    item_vectors: np.ndarray, queries: np.ndarray, blocked: list[np.ndarray], target_recall: float, seed: int = 0
) -> tuple[IvfIndex, dict[str, Any]]:
    """Build the index, then pick the smallest base probe count whose recall@100 reaches
    ``target_recall`` on the sample ``queries`` (the largest tried if none does).

    Scanning more cells scans a superset of the items, so recall grows with the probe count and
    a bisection finds the smallest in ~8 measurements.
    """
    started = time.perf_counter()
    index = IvfIndex.build(item_vectors, seed=seed)
    built = time.perf_counter()
    exact = _retrieve(ExactRetriever(item_vectors), queries, blocked)
    recalls: dict[int, float] = {}

    def recall_at(n_probe: int) -> float:
        if n_probe not in recalls:
            recalls[n_probe] = _recall(_retrieve(AnnRetriever(item_vectors, index, n_probe), queries, blocked), exact)
        return recalls[n_probe]

    low, high = 1, max(1, math.ceil(_MAX_PROBE_SHARE * index.n_lists))
    while low < high:  # the smallest probe count reaching the target, else ``high``
        middle = (low + high) // 2
        if recall_at(middle) >= target_recall:
            high = middle
        else:
            low = middle + 1
    n_probe, recall = low, recall_at(low)
    meta = {
        "kind": "ivf",
        "metric": "inner_product",
        "n_lists": index.n_lists,
        "n_probe": n_probe,
        f"recall_at_{REFERENCE_DEPTH}": round(recall, 4),
        "recall_users": len(queries),
        "target_recall": target_recall,
        "build_seconds": round(built - started, 2),
        "tune_seconds": round(time.perf_counter() - built, 2),
    }
    return index, meta


def _retrieve(
    retriever: Retriever, queries: np.ndarray, blocked: list[np.ndarray], allowed: np.ndarray | None = None
) -> list[np.ndarray]:
    found = retriever.top(queries, [REFERENCE_DEPTH] * len(queries), blocked, [allowed] * len(queries))
    return [c.item_idx for c in found]


def _recall(approximate: list[np.ndarray], exact: list[np.ndarray]) -> float:
    hits = [len(np.intersect1d(a, e)) / len(e) for a, e in zip(approximate, exact) if len(e)]
    return float(np.mean(hits)) if hits else 1.0


# --- benchmark ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticFactors:
    """Folded factors shaped like BPR factors trained on MovieLens-1M (spectrum, means, biases)."""

    user_factors: np.ndarray
    item_factors: np.ndarray
    seen_indptr: np.ndarray
    seen_indices: np.ndarray
    popular_items: np.ndarray

    @classmethod
    def generate(cls, n_items: int, n_users: int, dim: int = 64, seed: int = 0) -> SyntheticFactors:
        """Gaussian embeddings with the measured ML-1M factor spectrum (~1.3 * (1 + j)^-0.4),
        item and user means anti-aligned, item bias N(-0.2, 0.53); each user has 10-500 seen
        items, half from their own top 2,000 (trained factors score seen items high)."""
        rng = np.random.default_rng(seed)
        basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
        spectrum = 1.3 * (1.0 + np.arange(dim)) ** -0.4
        mean = rng.standard_normal(dim)
        mean /= np.linalg.norm(mean)
        items = np.empty((n_items, dim + 2), dtype=np.float32)
        for a in range(0, n_items, 65_536):  # chunks: float64 temporaries for 1M x 64 are 0.5 GB
            b = min(n_items, a + 65_536)
            items[a:b, 2:] = (rng.standard_normal((b - a, dim)) * spectrum) @ basis.T + 0.67 * mean
        items[:, 0] = 1.0
        items[:, 1] = rng.normal(-0.2, 0.53, n_items)
        users = np.empty((n_users, dim + 2), dtype=np.float32)
        users[:, 0] = 0.0
        users[:, 1] = 1.0
        users[:, 2:] = (rng.standard_normal((n_users, dim)) * spectrum) @ basis.T - 1.4 * mean
        seen = []
        for u in range(n_users):
            count = int(np.clip(rng.lognormal(math.log(40), 1.0), 10, 500))
            top = np.argpartition(-(items @ users[u]), min(2000, n_items) - 1)[:2000]
            seen.append(np.unique(np.concatenate([rng.choice(top, count // 2), rng.integers(0, n_items, count // 2)])))
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(s) for s in seen])
        return cls(users, items, indptr, np.concatenate(seen).astype(np.int32), np.arange(100, dtype=np.int32))


def benchmark(n_items: int, dim: int = 64, n_users: int = 300, seed: int = 0) -> dict[str, Any]:
    """Build, tune, save and memory-map the index for a synthetic catalog; time single-user
    retrieval of 100 unseen candidates, exact and approximate, with and without a filter."""
    data = SyntheticFactors.generate(n_items, n_users, dim, seed)
    queries = data.user_factors
    indptr, indices = data.seen_indptr, data.seen_indices
    blocked = [indices[indptr[u] : indptr[u + 1]].astype(np.int64) for u in range(n_users)]
    index, meta = build_ann_index(data.item_factors, queries, blocked, Settings().ann_min_recall + _RECALL_MARGIN, seed)
    with tempfile.TemporaryDirectory() as tmp:
        files = {ANN_CENTROIDS: index.centroids, ANN_LIST_OFFSETS: index.list_offsets}
        files.update({ANN_ITEM_IDX: index.item_idx, ANN_VECTORS: index.vectors})
        for name, array in files.items():
            np.save(Path(tmp) / name, array, allow_pickle=False)
        index_bytes = sum((Path(tmp) / name).stat().st_size for name in files)
        mapped = {name: np.load(Path(tmp) / name, allow_pickle=False, mmap_mode="r") for name in files}
        index = IvfIndex(mapped[ANN_CENTROIDS], mapped[ANN_LIST_OFFSETS], mapped[ANN_ITEM_IDX], mapped[ANN_VECTORS])
        exact = ExactRetriever(data.item_factors)
        approximate = AnnRetriever(data.item_factors, index, int(meta["n_probe"]))
        rng = np.random.default_rng(seed + 1)
        a_third = rng.random(n_items) < 1 / 3  # a filter keeping a third of the catalog
        one_percent = rng.random(n_items) < 0.01  # one keeping 1%: the exact fallback
        result = {
            "n_items": n_items,
            "dim": dim,
            "ann": meta,
            "index_mib": round(index_bytes / 2**20, 1),
            "item_factors_mib": round(data.item_factors.nbytes / 2**20, 1),
            "exact_ms": _latency(exact, queries, blocked, None),
            "ann_ms": _latency(approximate, queries, blocked, None),
            "ann_filter_third_ms": _latency(approximate, queries, blocked, a_third),
            "ann_filter_1pct_ms": _latency(approximate, queries, blocked, one_percent),
            "recall_filter_third": _recall(
                _retrieve(approximate, queries, blocked, a_third), _retrieve(exact, queries, blocked, a_third)
            ),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            # Timings are only comparable at one BLAS thread (the image sets OMP_NUM_THREADS=1)
            # and on an idle machine.
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_1m": round(os.getloadavg()[0], 2),
        }
    return result


def _latency(
    retriever: Retriever, queries: np.ndarray, blocked: list[np.ndarray], allowed: np.ndarray | None
) -> dict[str, float]:
    times = []
    for q in range(len(queries)):
        started = time.perf_counter()
        retriever.top(queries[q : q + 1], [REFERENCE_DEPTH], [blocked[q]], [allowed])
        times.append(time.perf_counter() - started)
    ms = np.asarray(times) * 1000.0
    return {"p50": round(float(np.median(ms)), 3), "p99": round(float(np.percentile(ms, 99)), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.ann_index", description=benchmark.__doc__)
    parser.add_argument("--n-items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64, help="embedding dim (the folded vectors have dim + 2)")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n_items < 1000 or args.users < 1 or args.dim < 1:
        parser.error("--n-items must be at least 1000, --users and --dim at least 1")
    json.dump(benchmark(args.n_items, args.dim, args.users, args.seed), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
