"""Command line: ``python -m training {run,recommend,feature-store,deploy} ...``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from training.datasets import DATASET_NAMES, DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train, evaluate and write the model artifact")
    run.add_argument("--dataset", choices=DATASET_NAMES, help="data source (default: ml-100k, or from SM_CHANNEL_*)")
    run.add_argument("--interactions", type=Path, help="csv: interactions file")
    run.add_argument("--items", type=Path, help="csv: items file (optional)")
    run.add_argument("--reviews", type=Path, help="amazon: reviews JSONL(.gz)")
    run.add_argument("--meta", type=Path, help="amazon: meta JSONL(.gz) (optional)")
    run.add_argument("--column", action="append", default=[], metavar="OURS=THEIRS",
                     help="csv: rename a column, e.g. --column user_id=customer")
    run.add_argument("--n-users", type=int, default=2000, help="synthetic: users")
    run.add_argument("--n-items", type=int, default=5000, help="synthetic: items")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", type=Path, help="output folder (default: $SM_MODEL_DIR in a training job, else out/)")
    run.add_argument("--objective", choices=["bpr", "rating"], help="retrieval objective (default: best on validation)")
    run.add_argument("--ranker-objective", choices=["reg:squarederror", "rank:ndcg"], default="reg:squarederror")
    run.add_argument("--ranker-period", type=int, default=5,
                     help="last N training interactions per user that teach the ranker (default 5)")
    run.add_argument("--dim", type=int, default=64, help="MF embedding dimension")
    run.add_argument("--epochs", type=int, default=40, help="MF epoch upper bound (early stopping picks)")
    run.add_argument("--feature-group", help="Feature Store item feature group name")
    # Measured on the 2-core build machine: with other processes on the cores, 2 torch threads
    # ran an MF epoch 10-15x slower than 1 (the threads wait on each other); the embedding
    # updates of this model are small, so more threads pay off only on big, idle machines.
    run.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    run.add_argument("--no-progress", action="store_true")

    rec = sub.add_parser("recommend", help="batch recommendations with the serving code")
    rec.add_argument("--model", type=Path, required=True)
    rec.add_argument("--users", type=Path, required=True, help="one user id per line")
    rec.add_argument("--k", type=int, default=10)
    rec.add_argument("--out", type=Path, required=True)

    fs = sub.add_parser("feature-store", help="create the item feature group and ingest the item features")
    fs.add_argument("action", choices=["create", "ingest", "setup"], help="setup = create + ingest")
    fs.add_argument("--model", type=Path, required=True)
    fs.add_argument("--region", default=None, help="AWS region (default: $AWS_REGION / $AWS_DEFAULT_REGION)")
    fs.add_argument("--endpoint-url", default=None, help="e.g. the local Feature Store server")
    fs.add_argument("--role-arn", default=None)
    fs.add_argument("--concurrency", type=int, default=8)

    for name, purpose in (("deploy", "create a SageMaker endpoint for a model.tar.gz"),
                          ("teardown", "delete an endpoint, its config, model and autoscaling")):
        sub.add_parser(name, help=f"{purpose} (see: python -m training {name} --help)", add_help=False)

    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("deploy", "teardown"):
        from training.deployment import main as deployment_main

        return deployment_main([args.command, *rest])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return {"run": _run, "recommend": _recommend, "feature-store": _feature_store}[args.command](args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from training.datasets import load_dataset
    from training.mf import MFConfig
    from training.pipeline import PipelineConfig, format_table, run
    from training.ranker import RankerConfig

    import torch

    torch.set_num_threads(args.threads)
    job = _training_job_paths()
    dataset_name, options = _dataset_options(args, job)
    dataset = load_dataset(dataset_name, **options)
    config = PipelineConfig(
        retrieval_objective=args.objective,
        mf=MFConfig(dim=args.dim, epochs=args.epochs, seed=args.seed, show_progress=not args.no_progress),
        ranker=RankerConfig(objective=args.ranker_objective, seed=args.seed),
        feature_group_name=args.feature_group,
        ranker_period=args.ranker_period,
        show_progress=not args.no_progress,
    )
    out = args.out or (Path(tempfile.mkdtemp(prefix="twostage-job-")) if job else Path("out"))
    out.mkdir(parents=True, exist_ok=True)
    result = run(dataset, out, config)
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(result.metrics, indent=2) + "\n", encoding="utf-8")
    if job:
        # SageMaker tars SM_MODEL_DIR itself: the model files go at its root.
        for path in result.model_dir.iterdir():
            shutil.copy2(path, job["model"] / path.name)
        shutil.copy2(metrics_path, job["output"] / "metrics.json")
    print(format_table(result.metrics))
    recall = {name: round(o["val_recall@100"], 4) for name, o in result.metrics["objectives"].items()}
    print(f"\nretrieval objective: {result.metrics['retrieval_objective']} (validation Recall@100: {json.dumps(recall)})")
    print(f"model: {job['model'] if job else result.model_dir}\nartifact: {result.tar_path}\nmetrics: {metrics_path}")
    return 0


def _dataset_options(args: argparse.Namespace, job: dict[str, Path] | None) -> tuple[str, dict[str, Any]]:
    name = args.dataset
    if job and name is None:
        prefix = "SM_CHANNEL_"
        channels = {k[len(prefix) :].lower(): Path(v) for k, v in os.environ.items() if k.startswith(prefix)}
        if "reviews" in channels:
            return "amazon", {"reviews": _single_file(channels["reviews"]),
                              "meta": _single_file(channels["meta"]) if "meta" in channels else None}
        if "interactions" in channels:
            return "csv", {"interactions": _single_file(channels["interactions"]),
                           "items": _single_file(channels["items"]) if "items" in channels else None}
        name = "ml-100k"
    name = name or "ml-100k"
    if name == "csv":
        if args.interactions is None:
            raise DataError("--dataset csv needs --interactions PATH")
        columns = dict(c.split("=", 1) for c in args.column) or None
        return name, {"interactions": args.interactions, "items": args.items, "columns": columns}
    if name == "amazon":
        if args.reviews is None:
            raise DataError("--dataset amazon needs --reviews PATH (and optionally --meta PATH)")
        return name, {"reviews": args.reviews, "meta": args.meta}
    if name == "synthetic":
        return name, {"n_users": args.n_users, "n_items": args.n_items, "seed": args.seed}
    return name, {}


def _single_file(channel: Path) -> Path:
    if channel.is_file():
        return channel
    files = sorted(p for p in channel.iterdir() if p.is_file())
    if len(files) != 1:
        raise DataError(f"{channel}: expected exactly one file in the channel, found {len(files)}")
    return files[0]


def _training_job_paths() -> dict[str, Path] | None:
    """SageMaker training job mode: SM_MODEL_DIR is where the model must be written."""
    model = os.environ.get("SM_MODEL_DIR")
    if not model:
        return None
    output = Path(os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"))
    output.mkdir(parents=True, exist_ok=True)
    Path(model).mkdir(parents=True, exist_ok=True)
    return {"model": Path(model), "output": output}


def _recommend(args: argparse.Namespace) -> int:
    from training.pipeline import recommend_file

    n = recommend_file(args.model, args.users, args.k, args.out)
    print(f"wrote {n} users to {args.out}")
    return 0


def _feature_store(args: argparse.Namespace) -> int:
    from training.feature_store import create_item_feature_group, ingest_items, make_clients
    from twostage_rec.artifact import load_artifact

    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        print("error: no region: pass --region or set AWS_REGION", file=sys.stderr)
        return 2
    artifact = load_artifact(args.model)
    sm, runtime = make_clients(region, args.endpoint_url)
    if args.action in ("create", "setup"):
        name = create_item_feature_group(sm, artifact, role_arn=args.role_arn)
        print(f"feature group {name} ready")
    if args.action in ("ingest", "setup"):
        n = ingest_items(runtime, artifact, concurrency=args.concurrency)
        print(f"ingested {n} item records into {artifact.manifest.feature_store.feature_group_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
