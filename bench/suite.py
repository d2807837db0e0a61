"""The benchmark plans: which models, which measurements, in which order (one server at a time)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from bench import event_writes, fresh_history, inprocess, models, sequence_encoder, served, serving_scale

ML_1M: Final = models.ML_1M
IMAGE: Final = "twostage-rec:bench"
MILLION: Final = models.synthetic_name(1_000_000)
QUICK_ITEMS: Final = 2_000  # about ML-100k's shape (1,682 items, 943 users), written in ~2 s
QUICK_USERS: Final = 1_000
HOST_WORKERS: Final = 2  # one per core on this machine, the serve default


def run_quick(args: argparse.Namespace, results: dict[str, Any], logs: Path) -> None:
    """The regression check: the serving path on a small synthetic model, no training, no Docker,
    no sequence encoder comparison (it needs torch: ~20 s of export and import alone)."""
    model = models.synthetic_model(QUICK_ITEMS, QUICK_USERS, retrain=args.retrain)
    name = models.synthetic_name(QUICK_ITEMS)
    step(f"in-process latency on {name}")
    results["inprocess"] = {name: inprocess.stage_latency(model, args.requests // 2)}
    step("batch requests in-process")
    results["batch"] = {"model": name, "inprocess": inprocess.batch_cost(model, (10, 100), args.requests // 2)}
    step("feature sources")
    results["feature_sources"] = {"model": name, **inprocess.feature_sources(model, args.requests // 10)}
    step("host multi-model-server, sequential")
    host = served.HostServer(model, HOST_WORKERS, logs / "host.log")
    results["host"] = serve_and_load(host, model, name, results["inprocess"][name], args.requests // 4, (1,))
    results["notes"].append("fresh-history and event-recording benchmarks skipped in the quick run (they need Docker "
                            "and a few minutes): `python -m bench --only fresh-history`")


def run_fresh_history(args: argparse.Namespace, results: dict[str, Any], logs: Path) -> None:
    """Issue 11's targets alone (``--only fresh-history``): the container with the user-history
    group on ML-100k, then the event-recording benchmark."""
    image = container_image(args, results)
    fresh_history_section(args, results, image, logs)


def run_full(args: argparse.Namespace, results: dict[str, Any], logs: Path) -> None:
    """Everything: ML-1M (trained when the commit changed) and the synthetic catalogs in-process,
    the sequence encoder comparison, the IVF retriever alone, then the model servers one at a time,
    and last the serving-scale grid."""
    ml = models.movielens_model(ML_1M, retrain=args.retrain)
    synthetic = {models.synthetic_name(n): models.synthetic_model(n, retrain=args.retrain)
                 for n in (100_000, 1_000_000)}
    results["inprocess"] = {}
    for name, model in {ML_1M: ml, **synthetic}.items():
        step(f"in-process latency on {name}")
        results["inprocess"][name] = inprocess.stage_latency(model, args.requests)
    step("sequence encoder: ONNX Runtime vs PyTorch (python -m bench.sequence_encoder)")
    try:
        results["sequence_encoder"] = sequence_encoder.measure_isolated(results["inprocess"][ML_1M]["n_items"],
                                                                        args.requests)
    except RuntimeError as exc:  # no torch here: the other results still stand
        results["notes"].append(f"sequence encoder comparison skipped: {exc}")
    step("1M items: exact vs the IVF index (build, recall@100, single-user retrieval)")
    from training.ann_index import benchmark as ann_benchmark

    results["ann"] = ann_benchmark(1_000_000)
    step("batch requests in-process")
    results["batch"] = {"model": ML_1M, "inprocess": inprocess.batch_cost(ml, (10, 100), args.requests)}
    step("feature sources")
    results["feature_sources"] = {"model": ML_1M, **inprocess.feature_sources(ml, args.requests // 2)}

    baseline = results["inprocess"][ML_1M]
    step("host multi-model-server, ML-1M")
    host = served.HostServer(ml, HOST_WORKERS, logs / "host.log")
    results["host"] = serve_and_load(host, ml, ML_1M, baseline, args.requests, (1, 2, 8), batches=True)
    results["batch"]["host"] = results["host"].pop("batch")

    image = container_image(args, results)
    if image:
        try:  # the engine is shared with other work: report its failures, keep the other results
            step("container multi-model-server, ML-1M")
            container = served.ContainerServer(image, ml, HOST_WORKERS)
            results["container"] = serve_and_load(container, ml, ML_1M, baseline, args.requests, (1, 2, 8))
        except RuntimeError as exc:
            results["notes"].append(f"container benchmarks failed: {str(exc).splitlines()[0]}")
    fresh_history_section(args, results, image, logs)

    results["memory"] = {}
    for name, model in ((ML_1M, ml), (MILLION, synthetic[MILLION])):
        runs = []
        for workers in (1, 2, 4):
            step(f"memory: {name} with {workers} workers")
            runs.append(memory_run(model, workers, logs / f"memory-{name}-{workers}.log"))
        growth = (runs[-1]["total_mb"] - runs[0]["total_mb"]) / 3
        results["memory"][name] = {"runs": runs, "growth_per_worker_mb": round(growth, 1)}
    serving_scale_section(args, results, logs)


def run_serving_scale(args: argparse.Namespace, results: dict[str, Any], logs: Path) -> None:
    """Issue 13's grid alone (``--only serving-scale``)."""
    serving_scale_section(args, results, logs)


SECTIONS: Final = {"fresh-history": run_fresh_history, "serving-scale": run_serving_scale}  # --only NAME


def serving_scale_section(args: argparse.Namespace, results: dict[str, Any], logs: Path) -> None:
    """Catalog size x user count (:mod:`bench.serving_scale`), the results so far saved next to
    the JSON after every cell."""
    cells = serving_scale.grid(getattr(args, "scale_items", None) or serving_scale.GRID_ITEMS,
                               getattr(args, "scale_users", None) or serving_scale.GRID_USERS)
    partial = Path(results["json"]).with_suffix(".partial.json")
    results["serving_scale"] = serving_scale.measure_grid(
        cells, min(args.requests, serving_scale.PROBE_REQUESTS), logs, retrain=args.retrain, partial=partial)


def container_image(args: argparse.Namespace, results: dict[str, Any]) -> str | None:
    """The image the container benchmarks run: ``--image``, or this checkout built as :data:`IMAGE`.

    ``None``, with a note saying why, when no Docker engine answers or the build fails.
    """
    reason = served.docker_unavailable()
    if reason:
        results["notes"].append(f"container benchmarks skipped: no Docker engine ({reason})")
        return None
    if args.image:
        return args.image
    step(f"docker build -t {IMAGE}")
    try:
        results["notes"].append(f"image {IMAGE} built in {served.build_image(IMAGE):.1f} s")
    except RuntimeError as exc:
        results["notes"].append(f"container benchmarks failed: {str(exc).splitlines()[0]}")
        return None
    return IMAGE


def fresh_history_section(args: argparse.Namespace, results: dict[str, Any], image: str | None, logs: Path) -> None:
    """Issue 11's targets: the user-history group through the container on ML-100k (needs
    ``image``), and recording events at 1,000 a second (no Docker). A failure becomes a note."""
    if image:
        try:
            model = models.movielens_model(models.ML_100K, retrain=args.retrain)
            step(f"fresh history: {models.ML_100K} in the container with the local Feature Store")
            results["fresh_history"] = fresh_history.measure(image, model, args.requests, HOST_WORKERS,
                                                             logs / "feature-store.log")
        except RuntimeError as exc:
            results["notes"].append(f"fresh-history benchmarks failed: {str(exc).splitlines()[0]}")
    step("recording events: python -m local_test.feature_store.events_bench")
    try:
        results["event_writes"] = event_writes.measure()
    except RuntimeError as exc:
        results["notes"].append(f"event-recording benchmark failed: {exc}")


def serve_and_load(
    server: served.HostServer | served.ContainerServer,
    model: Path,
    name: str,
    baseline: dict[str, Any],
    n_requests: int,
    concurrencies: Sequence[int],
    batches: bool = False,
) -> dict[str, Any]:
    """Start a server, warm it, run each concurrency (and batches of 1, 10, 100 users), stop it.

    ``baseline`` is the in-process result for the same model: overheads are measured against it.
    """
    from twostage_rec.artifact import read_manifest

    user_ids = model_user_ids(model)
    bodies = [inprocess.single_body(u) for u in inprocess.random_users(user_ids, n_requests, seed=1)]
    with server:
        cold_start = server.start(bodies[0])
        served.run_load(server.host, server.port, bodies[:200], 8)  # every worker answers before we time
        loads = []
        for concurrency in concurrencies:
            load = served.run_load(server.host, server.port, bodies, concurrency)
            local = baseline["handler_ms"]["p50"]
            load["overhead_ms"] = round(load["latency_ms"]["p50"] - local, 3)
            load["ratio_to_inprocess"] = round(load["latency_ms"]["p50"] / local, 3)
            loads.append(load)
        batch = {}
        for size in (1, 10, 100) if batches else ():
            users = inprocess.random_users(user_ids, 20 * size, seed=2)
            group = bodies[:500] if size == 1 else inprocess.batch_bodies(users, size)
            load = served.run_load(server.host, server.port, group, 1)
            batch[str(size)] = {"requests": load["requests"], "per_user_p50_ms": load["latency_ms"]["p50"] / size}
    out = {"model": name, "model_version": read_manifest(model).model_version, "workers": server.workers,
           "cold_start_s": round(cold_start, 2), "loads": loads}
    return {**out, "batch": batch} if batches else out


def memory_run(model: Path, workers: int, log: Path) -> dict[str, Any]:
    """PSS of a host server with ``workers`` workers after every worker has answered requests."""
    user_ids = model_user_ids(model)
    bodies = [inprocess.single_body(u) for u in inprocess.random_users(user_ids, 100 * workers, seed=3)]
    with served.HostServer(model, workers, log) as server:
        cold_start = server.start(bodies[0])
        served.run_load(server.host, server.port, bodies, 8)
        time.sleep(1.0)  # let Java's and the workers' allocations settle
        return {"workers": workers, "cold_start_s": round(cold_start, 2), **server.pss_mb()}


def model_user_ids(model: Path) -> list[str]:
    """Every user id of a model folder, in model order (read from the artifact's id tables)."""
    from twostage_rec.artifact import load_artifact

    return list(load_artifact(model, verify_checksums=False).user_ids)


def step(message: str) -> None:
    print(f"[bench] {message}", flush=True)

