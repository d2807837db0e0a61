"""Serving at scale (issue 13): size on disk, cold start, memory per worker and latency over a grid
of catalog size x user count, on synthetic models in the Amazon shape (many users, few
interactions each: :func:`bench.models.sparse_histories`).

``python -m bench --only serving-scale`` runs the grid (:func:`measure_grid`). Per cell:

- the artifact's bytes on disk, split into what grows with the users, with the items, and the rest;
- in a fresh process (``python -m bench.serving_scale MODEL_DIR``, :func:`probe`): the import,
  ``TwoStageRecommender.from_model_dir`` and the first recommendation, the process's memory after
  it, then the handler's p50 / p99 over random known users (id lookups included);
- the real ``serve`` (multi-model-server) on this host with 1, 2 and 4 workers: process start to
  the first good ``/invocations``, and the PSS of every process once each worker has answered.

Cold starts run with the artifact in the page cache (it was just written or read): a freshly
unpacked model on a new instance is in the cache too, but one evicted since would be read from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

REPO: Final = Path(__file__).resolve().parent.parent
GRID_ITEMS: Final = (10_000, 100_000, 1_000_000)
GRID_USERS: Final = (100_000, 1_000_000, 10_000_000)
HISTORY_MEAN: Final = 5.0  # interactions per user on average: the Amazon Reviews shape
WORKERS: Final = (1, 2, 4)
PROBE_REQUESTS: Final = 1000  # single-user requests timed in the fresh process
MEMORY_REQUESTS: Final = 400  # the same requests for every worker count
WARMUP: Final = 50
# Issue 13's targets, reported against (never asserted).
TARGET_USERS: Final = 10_000_000
COLD_START_S: Final = 10.0
ADDED_WORKER_MB: Final = 50.0
ML_LIKE_ITEMS: Final = 10_000  # up to this catalog size the single-user budget is ML-1M's
SMALL_CATALOG_MS: Final = 3.0
LARGE_CATALOG_MS: Final = 10.0
_SUFFIXES: Final = {"k": 10**3, "m": 10**6}


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    n_items: int
    n_users: int

    @property
    def name(self) -> str:
        return f"{count_label(self.n_items)} items x {count_label(self.n_users)} users"


def parse_count(text: str) -> int:
    """``"10k"`` -> 10,000, ``"1M"`` -> 1,000,000, ``"2500"`` -> 2,500 (``ValueError`` otherwise)."""
    cleaned = text.strip().replace("_", "").replace(",", "").lower()
    factor = _SUFFIXES.get(cleaned[-1:], 1)
    digits = cleaned[:-1] if cleaned[-1:] in _SUFFIXES else cleaned
    try:
        value = float(digits) * factor
    except ValueError:
        raise ValueError(f"{text!r} is not a count like 10k, 1M or 2500") from None
    if value < 1 or value != int(value):
        raise ValueError(f"{text!r} is not a positive whole count")
    return int(value)


def count_label(n: int) -> str:
    """The shortest exact label of a count: 10k, 1M, 2.5M, 1234."""
    for suffix, factor in (("M", 10**6), ("k", 10**3)):
        if n >= factor and (n * 10) % factor == 0:
            return f"{n / factor:g}{suffix}"
    return str(n)


def grid(items: Sequence[int], users: Sequence[int]) -> list[Cell]:
    """Every (items, users) pair, smallest artifacts first (users, then items): an interrupted run
    still has the cheap cells."""
    return [Cell(i, u) for u in sorted(set(users)) for i in sorted(set(items))]


def split_bytes(sizes: Mapping[str, int]) -> dict[str, int]:
    """Bytes of an artifact's files that grow with the users, with the items, and the rest."""
    from twostage_rec import artifact as a

    # The interactions' timelines grow with the users (at a fixed number of interactions per user).
    per_user = {a.USER_FACTORS, a.SEEN_INDPTR, a.SEEN_INDICES, a.SEEN_TIMESTAMPS, a.SEEN_RATING_SUMS,
                a.ITEM_TIMELINE_TIMESTAMPS, a.ITEM_TIMELINE_RATING_SUMS, *a.USER_ID_FILES}
    per_item = {a.ITEM_FACTORS, a.ITEM_FEATURES, a.ITEM_TIMELINE_INDPTR, a.NEIGHBOUR_INDPTR, a.NEIGHBOUR_ITEMS,
                a.NEIGHBOUR_SCORES,
                a.SEQUENCE_ITEM_VECTORS, *a.ITEM_ID_FILES, *a.ANN_FILES,
                *(a.SEQUENCE_ANN_PREFIX + name for name in a.ANN_FILES)}
    out = {"users": 0, "items": 0, "other": 0}
    for name, size in sizes.items():
        out["users" if name in per_user else "items" if name in per_item else "other"] += size
    return out


def added_per_worker(runs: Sequence[Mapping[str, Any]]) -> float | None:
    """Total PSS added per extra worker, from the fewest to the most workers measured (MB)."""
    if len(runs) < 2:
        return None
    first, last = min(runs, key=lambda r: r["workers"]), max(runs, key=lambda r: r["workers"])
    if last["workers"] == first["workers"]:
        return None
    return (last["total_mb"] - first["total_mb"]) / (last["workers"] - first["workers"])


def fit_linear(points: Sequence[tuple[int, int, float]]) -> dict[str, float] | None:
    """Least-squares ``value = base + per_item * items + per_user * users`` over (items, users, value)
    points; ``None`` with fewer than three points or a grid on one line."""
    if len(points) < 3:
        return None
    x = np.array([[1.0, i, u] for i, u, _ in points])
    y = np.array([v for _, _, v in points], dtype=np.float64)
    if np.linalg.matrix_rank(x) < 3:
        return None
    (base, per_item, per_user), *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"base": float(base), "per_item": float(per_item), "per_user": float(per_user)}


def p50_budget_ms(n_items: int) -> float:
    """The single-user in-process p50 budget at a catalog size (ML-1M-like, or large)."""
    return SMALL_CATALOG_MS if n_items <= ML_LIKE_ITEMS else LARGE_CATALOG_MS


Verdict = tuple[str, str | None, bool | None]  # target, what was measured (None: not measured), met


def verdicts(cells: Sequence[Mapping[str, Any]]) -> list[Verdict]:
    """Issue 13's targets over the measured cells: cold start and added PSS at 10M users, the p50
    budget at every cell."""
    big = [c for c in cells if c["n_users"] >= TARGET_USERS]
    out: list[Verdict] = []
    starts = [(c, _cold_start(c)) for c in big]
    starts = [(c, s) for c, s in starts if s is not None]
    out.append((f"10M users: cold start <= {COLD_START_S:g} s (fresh process to first answer; serve to first "
                "/invocations)",
                "; ".join(f"{c['name']}: {_cold_start_text(c)}" for c, _ in starts) or None,
                all(s <= COLD_START_S for _, s in starts) if starts else None))
    growth = [(c, c["served"].get("added_per_worker_mb")) for c in big if c.get("served")]
    growth = [(c, g) for c, g in growth if g is not None]
    out.append((f"10M users: PSS added per extra worker <= {ADDED_WORKER_MB:g} MB",
                "; ".join(f"{c['name']}: {g:.1f} MB" for c, g in growth) or None,
                all(g <= ADDED_WORKER_MB for _, g in growth) if growth else None))
    for budget in sorted({p50_budget_ms(c["n_items"]) for c in cells}):
        timed = [c for c in cells if p50_budget_ms(c["n_items"]) == budget and c.get("probe")]
        scope = f"<= {count_label(ML_LIKE_ITEMS)} items" if budget == SMALL_CATALOG_MS else \
            f"> {count_label(ML_LIKE_ITEMS)} items"
        out.append((f"Serving scale, {scope}: single-user handler p50 <= {budget:g} ms at every user count",
                    "; ".join(f"{c['name']}: {c['probe']['handler_ms']['p50']:.2f} / "
                              f"{c['probe']['handler_ms']['p99']:.2f}" for c in timed) + " ms (p50 / p99)"
                    if timed else None,
                    all(c["probe"]["handler_ms"]["p50"] <= budget for c in timed) if timed else None))
    return out


def _cold_start(c: Mapping[str, Any]) -> float | None:
    """The worse of the two cold starts measured for a cell (fresh process, serve with 1 worker)."""
    values = [c.get("probe", {}).get("first_answer_s"), _served_cold_start(c)]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _served_cold_start(c: Mapping[str, Any]) -> float | None:
    runs = c.get("served", {}).get("runs", [])
    return next((r["cold_start_s"] for r in runs if r["workers"] == 1), None)


def _cold_start_text(c: Mapping[str, Any]) -> str:
    probe, served = c.get("probe"), _served_cold_start(c)
    parts = [f"fresh process {probe['first_answer_s']:.1f} s" if probe else None,
             f"serve {served:.1f} s" if served is not None else None]
    return ", ".join(p for p in parts if p)


# --- measuring ---------------------------------------------------------------------------------


def measure_grid(cells: Sequence[Cell], n_requests: int, logs: Path, retrain: bool = False,
                 served: bool = True, partial: Path | None = None) -> dict[str, Any]:
    """Write (or reuse) each cell's model and measure it; ``partial`` gets the results so far after
    every cell (a long run cut short keeps what it measured)."""
    from bench import models

    out: dict[str, Any] = {"history_mean": HISTORY_MEAN, "workers": list(WORKERS), "requests": n_requests,
                           "cells": []}
    for cell in cells:
        _step(f"serving scale: {cell.name}")
        started = time.monotonic()
        model = models.synthetic_model(cell.n_items, cell.n_users, retrain=retrain, history_mean=HISTORY_MEAN)
        result = measure_cell(cell, model, n_requests, logs, served)
        result["seconds"] = round(time.monotonic() - started, 1)
        out["cells"].append(result)
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    out["fits"] = fits(out["cells"])
    out["interleaved"] = []
    for n_items in sorted({c.n_items for c in cells}):
        same = [c for c in out["cells"] if c["n_items"] == n_items]
        if len(same) > 1:
            _step(f"serving scale: {count_label(n_items)} items, every user count in turn in one process")
            run = run_interleaved([Path(c["model"]) for c in same], n_requests)
            out["interleaved"].append({"n_items": n_items, "n_users": [c["n_users"] for c in same],
                                       "handler_ms": run["handler_ms"], "load_avg": run["load_avg"]})
        if partial is not None:
            partial.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def fits(cells: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float] | None]:
    """Per-item and per-user costs fitted over the grid: disk bytes and 1-worker serve PSS (MB)."""
    disk = [(c["n_items"], c["n_users"], float(c["disk"]["total_bytes"])) for c in cells]
    one = [(c["n_items"], c["n_users"], r["total_mb"]) for c in cells
           for r in c.get("served", {}).get("runs", []) if r["workers"] == 1]
    return {"disk_bytes": fit_linear(disk), "serve_1_worker_pss_mb": fit_linear(one)}


def measure_cell(cell: Cell, model: Path, n_requests: int, logs: Path, served: bool = True) -> dict[str, Any]:
    """One cell: disk, the fresh-process probe, then ``serve`` with each of :data:`WORKERS`."""
    from twostage_rec.artifact import read_manifest

    sizes = {p.name: p.stat().st_size for p in model.iterdir() if p.is_file()}
    split = split_bytes(sizes)
    m = read_manifest(model)
    out: dict[str, Any] = {
        "name": cell.name, "n_items": cell.n_items, "n_users": cell.n_users, "model": str(model),
        "interactions": _interactions(model),
        "indexes": sorted(k for k in ("ann", "sequence_ann") if k in m.extra),
        "disk": {"total_bytes": sum(sizes.values()), **{f"{k}_bytes": v for k, v in split.items()},
                 "bytes_per_user": round(split["users"] / cell.n_users, 1),
                 "bytes_per_item": round(split["items"] / cell.n_items, 1)},
    }
    _step(f"  fresh process: from_model_dir, first answer, {n_requests} requests")
    out["probe"] = run_probe(model, n_requests)
    if served:
        out["served"] = serve_memory(model, logs / f"serve-{cell.n_items}x{cell.n_users}")
    return out


def _interactions(model: Path) -> int:
    from twostage_rec.artifact import HISTORY_ITEMS

    return int(np.load(model / HISTORY_ITEMS, mmap_mode="r", allow_pickle=False).shape[0])


def run_probe(model: Path, n_requests: int, seed: int = 0) -> dict[str, Any]:
    """:func:`probe` in a fresh process; ``first_answer_s`` is from that process's start (as the
    parent saw it) to its first recommendation."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "code"), str(REPO)])}
    command = [sys.executable, "-m", "bench.serving_scale", str(model), "--requests", str(n_requests),
               "--seed", str(seed)]
    started = time.time()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:4])} failed: {result.stderr.strip()[-2000:]}")
    body = json.loads(result.stdout.strip().splitlines()[-1])
    body["first_answer_s"] = round(body.pop("answered_at") - started, 3)
    return body


def serve_memory(model: Path, log_prefix: Path) -> dict[str, Any]:
    """``serve`` with each of :data:`WORKERS`: cold start (wall and CPU seconds) and PSS once
    every worker has answered, split into anonymous memory and mapped files.

    Every worker count gets the same requests (the same users): a user's rows are memory-mapped
    pages, shared by every worker that touches them, so different users per run would measure
    how many distinct users were asked, not what a worker adds.
    """
    from bench import inprocess, served
    from twostage_rec.artifact import load_ids

    user_ids = load_ids(model, "user")
    rng = np.random.default_rng(3)
    bodies = [inprocess.single_body(user_ids[int(u)]) for u in rng.integers(0, len(user_ids), MEMORY_REQUESTS)]
    runs = []
    for workers in WORKERS:
        _step(f"  serve with {workers} worker(s)")
        with served.HostServer(model, workers, Path(f"{log_prefix}-{workers}.log")) as server:
            cold_start = server.start(bodies[0])
            cpu_s = _cpu_seconds(server.processes())
            served.run_load(server.host, server.port, bodies, 8)  # 8 connections reach every worker
            time.sleep(1.0)  # let Java's and the workers' allocations settle
            pss = server.pss_mb()
            split = {row["pid"]: _smaps_rollup(row["pid"]) for row in pss["processes"]}
        roles = {role: round(sum(p["pss_mb"] for p in pss["processes"] if p["role"] == role), 1)
                 for role in ("serve", "java", "preload", "worker")}
        runs.append({"workers": workers, "cold_start_s": round(cold_start, 2), "cold_start_cpu_s": round(cpu_s, 2),
                     "total_mb": pss["total_mb"], "per_worker_mb": pss["per_worker_mb"], "roles_mb": roles,
                     "anon_mb": round(sum(x.get("Pss_Anon", 0.0) for x in split.values()), 1),
                     "file_mb": round(sum(x.get("Pss_File", 0.0) for x in split.values()), 1)})
    growth = added_per_worker(runs)
    anon = added_per_worker([{**r, "total_mb": r["anon_mb"]} for r in runs])
    return {"runs": runs, "requests": len(bodies), "added_per_worker_mb": None if growth is None else round(growth, 1),
            "added_anon_per_worker_mb": None if anon is None else round(anon, 1)}


def parse_smaps_rollup(text: str) -> dict[str, float]:
    """``/proc/PID/smaps_rollup`` as {field: MB} (``Pss_Anon``, ``Pss_File``, ...)."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) == 2 and fields[1] == "kB" and fields[0].isdigit():
            out[name.strip()] = int(fields[0]) / 1024.0
    return out


def _smaps_rollup(pid: int) -> dict[str, float]:
    try:
        return parse_smaps_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
    except OSError:  # gone, or a kernel without the file: the PSS total still stands
        return {}


def _cpu_seconds(processes: Sequence[Any]) -> float:
    """User + system CPU seconds used so far by ``processes`` (and the children they reaped)."""
    import psutil

    total = 0.0
    for process in processes:
        try:
            t = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _step(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# --- the fresh process -------------------------------------------------------------------------


def probe(model_dir: Path, n_requests: int, seed: int) -> dict[str, Any]:
    """Cold start and latency in this (fresh) process: import, load, first answer, memory, then
    ``n_requests`` single-user requests for random known users through the handler."""
    import psutil

    t0 = time.perf_counter()
    from twostage_rec.allocator import keep_heap_pages
    from twostage_rec.recommender import TwoStageRecommender
    from twostage_rec.request import RecommendationRequest
    from twostage_rec.settings import Settings

    t_import = time.perf_counter()
    keep_heap_pages(Settings().malloc_keep_mb << 20)  # as load_service does in every worker
    recommender = TwoStageRecommender.from_model_dir(model_dir)
    t_load = time.perf_counter()
    users = recommender.artifact.user_ids
    rng = np.random.default_rng(seed)
    recommender.recommend(RecommendationRequest(user_id=users[int(rng.integers(len(users)))]))
    t_first = time.perf_counter()
    answered_at = time.time()
    first_cpu_s = time.process_time()  # this process's CPU until now (its start included): the idle-machine time
    after_first = _memory(psutil.Process())

    from bench import inprocess
    from twostage_rec.handler import RecommendationService

    bodies = [inprocess.single_body(users[int(u)]) for u in rng.integers(0, len(users), n_requests)]
    timed = inprocess.time_handler(RecommendationService(recommender, recommender.settings), bodies)
    return {
        "answered_at": answered_at,
        "import_s": round(t_import - t0, 3),
        "load_s": round(t_load - t_import, 3),
        "first_s": round(t_first - t_load, 3),
        "first_answer_cpu_s": round(first_cpu_s, 3),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "memory_after_first_mb": after_first,
        "memory_after_requests_mb": _memory(psutil.Process()),
        "requests": timed["requests"],
        "handler_ms": timed["handler_ms"],
        "stages_ms": timed["stages_ms"],
        "degraded": timed["degraded"],
    }


def _memory(process: Any) -> dict[str, float]:
    """RSS, USS (private to the process: what another worker would add) and PSS, in MB."""
    info = process.memory_full_info()
    return {k: round(getattr(info, k) / 2**20, 1) for k in ("rss", "uss", "pss")}


def interleaved(model_dirs: Sequence[Path], n_requests: int, seed: int) -> dict[str, Any]:
    """Handler latency of several models in one process, one request to each in turn: on a
    shared machine the load drifts, and round-robin puts the same drift on every model, so their
    ratios hold where absolute times do not."""
    from bench import inprocess
    from bench.stats import summarize
    from twostage_rec.allocator import keep_heap_pages
    from twostage_rec.handler import RawRequest, RecommendationService, output_fn, predict_fn
    from twostage_rec.recommender import TwoStageRecommender
    from twostage_rec.settings import Settings

    keep_heap_pages(Settings().malloc_keep_mb << 20)  # as load_service does in every worker
    rng = np.random.default_rng(seed)
    runs = []
    for model_dir in model_dirs:
        recommender = TwoStageRecommender.from_model_dir(model_dir)
        users = recommender.artifact.user_ids
        bodies = [inprocess.single_body(users[int(u)]) for u in rng.integers(0, len(users), n_requests + WARMUP)]
        runs.append((RecommendationService(recommender, recommender.settings), bodies))
    wall: list[list[float]] = [[] for _ in runs]
    for i in range(n_requests + WARMUP):
        for k, (service, bodies) in enumerate(runs):
            started = time.perf_counter()
            output_fn(predict_fn(RawRequest(bodies[i]), service), "application/json")
            if i >= WARMUP:
                wall[k].append((time.perf_counter() - started) * 1000.0)
    return {"models": [str(m) for m in model_dirs], "requests": n_requests,
            "handler_ms": [summarize(w).to_json() for w in wall], "load_avg": [round(x, 2) for x in os.getloadavg()]}


def run_interleaved(model_dirs: Sequence[Path], n_requests: int) -> dict[str, Any]:
    """:func:`interleaved` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "code"), str(REPO)])}
    command = [sys.executable, "-m", "bench.serving_scale", *map(str, model_dirs), "--interleave",
               "--requests", str(n_requests)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"bench.serving_scale --interleave failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving_scale",
                                     description="one fresh-process probe of a model folder, or the interleaved "
                                                 "latency of several (JSON on stdout)")
    parser.add_argument("model_dir", type=Path, nargs="+")
    parser.add_argument("--interleave", action="store_true", help="round-robin latency of every model given")
    parser.add_argument("--requests", type=int, default=PROBE_REQUESTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.interleave:
        result = interleaved(args.model_dir, args.requests, args.seed)
    elif len(args.model_dir) == 1:
        result = probe(args.model_dir[0], args.requests, args.seed)
    else:
        parser.error("one model folder, or several with --interleave")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
