"""Command line: ``python -m training COMMAND ...``.

Commands: run, recommend, feature-store, events, deploy, rollback, invoke, transform, teardown, launch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from training.datasets import DataError
from training.run_options import add_run_arguments, run_arguments

# Forwarded to training.deployment_cli, which has their parsers.
DEPLOYMENT_COMMANDS: Final = ("deploy", "rollback", "invoke", "transform", "teardown")

if TYPE_CHECKING:
    from training.distributed import Distribution
    from training.job import JobEnvironment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train, evaluate and write the model artifact")
    add_run_arguments(run)

    rec = sub.add_parser("recommend", help="recommendations for a file of users or requests, with the serving code")
    rec.add_argument("--model", type=Path, required=True, help="the model directory (out/model)")
    given = rec.add_mutually_exclusive_group(required=True)
    given.add_argument("--requests", type=Path, metavar="IN.jsonl",
                       help="one /invocations request object per line (as_of included); answers one object per "
                            "line in input order, a bad line as {error, message, line}")
    given.add_argument("--users", type=Path, metavar="FILE", help="one user id per line; writes {user_id, items}")
    rec.add_argument("--k", type=int, default=10, help="with --users: items per user (default 10)")
    rec.add_argument("--out", type=Path, required=True, metavar="OUT.jsonl")

    fs = sub.add_parser("feature-store", help="create the item and user-history feature groups and fill them")
    fs.add_argument("action", choices=["create", "ingest", "setup"],
                    help="create the groups, ingest items + seed histories, or both (setup)")
    fs.add_argument("--model", type=Path, required=True)
    _add_connection_arguments(fs)
    fs.add_argument("--role-arn", default=None)
    fs.add_argument("--user-history-group", default=None, metavar="NAME",
                    help="user-history group (default: the model manifest's)")
    fs.add_argument("--concurrency", type=int, default=8)

    events = sub.add_parser("events", help="record user interactions into the user-history feature group")
    events.add_argument("action", choices=["put"])
    events.add_argument("--feature-group", required=True, metavar="NAME", help="the user-history group")
    events.add_argument("--user-id", help="one event: the user")
    events.add_argument("--item-id", help="one event: the item")
    events.add_argument("--timestamp", help="one event: epoch seconds or ISO 8601 (default: now)")
    events.add_argument("--file", type=Path, help="a CSV of events: user_id,item_id[,timestamp]")
    _add_connection_arguments(events)
    events.add_argument("--history-length", type=int, default=50,
                        help="events kept per user; must equal the model manifest's history_length (default 50)")
    events.add_argument("--concurrency", type=int, default=8, help="users written in parallel (default 8)")
    events.add_argument("--max-attempts", type=int, default=5, help="botocore attempts per call (default 5)")
    events.add_argument("--no-progress", action="store_true")

    for name, purpose in (("deploy", "create a SageMaker endpoint for a model.tar.gz, or --update a live one"),
                          ("rollback", "return an endpoint to the config its last deploy --update replaced"),
                          ("invoke", "send one request to an endpoint (optionally one variant) and print the answer"),
                          ("transform", "batch recommendations: a SageMaker Batch Transform over JSON lines"),
                          ("teardown", "delete an endpoint, its config, models, alarms and autoscaling"),
                          ("launch", "train as a SageMaker training job on one or several instances")):
        sub.add_parser(name, help=f"{purpose} (see: python -m training {name} --help)", add_help=False)

    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in DEPLOYMENT_COMMANDS:
        from training.deployment_cli import main as deployment_main

        return deployment_main([args.command, *rest])
    if args.command == "launch":
        from training.launch import main as launch_main

        return launch_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        commands = {"run": _run, "recommend": _recommend, "feature-store": _feature_store, "events": _events}
        return commands[args.command](args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def job_entry(argv: list[str]) -> int:
    """SageMaker's entry script: ``--name value`` hyper-parameter pairs to ``python -m training run``."""
    from training.job import JobEnvironment

    try:
        arguments = run_arguments(argv)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        job = JobEnvironment.from_environment()
        if job is not None:
            job.fail(str(exc))
        return 2
    return main(["run", *arguments])


def _run(args: argparse.Namespace) -> int:
    from training.distributed import Distribution, DistributionError
    from training.job import JobEnvironment

    try:
        distribution = Distribution.from_environment()
    except DistributionError as exc:
        raise DataError(str(exc)) from None
    job = JobEnvironment.from_environment()
    try:
        if job is not None:
            job.check(distribution)
        return _train(args, distribution, job)
    except DataError as exc:
        if job is not None:
            job.fail(str(exc))
        raise


def _train(args: argparse.Namespace, distribution: Distribution, job: JobEnvironment | None) -> int:
    from training.datasets import load_dataset
    from training.distributed import barrier, process_group
    from training.models.mf import MFConfig
    from training.models.sequence import SequenceConfig
    from training.pipeline import EVALUATION_USERS, RANKER_OBJECTIVES, RANKER_SAMPLE_FILE, PipelineConfig, run
    from training.ranker import RankerConfig
    from training.report import (
        PLOT_FILE,
        format_ablations,
        format_by_gap,
        format_paired,
        format_replay,
        format_stage_one,
        format_table,
        write_plots,
    )
    from training.report_budget import UNLIMITED, ReportBudget
    from training.stage_costs import StageCosts
    from twostage_rec.allocator import keep_freed_memory

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.release_memory:
        keep_freed_memory()
    if not distribution.is_main:  # every rank logs the same stages: rank 0 speaks for them
        logging.getLogger().setLevel(logging.WARNING)
    # Every rank prepares the whole data set: cheap next to training, and deterministic, so the
    # ranks agree on every index without sending data (docs/training.md, "Training beyond one machine").
    dataset_name, options = _dataset_options(args, job)
    load = StageCosts()
    with load.stage("load"):
        dataset = load_dataset(dataset_name, **options)
    objectives = RANKER_OBJECTIVES if args.ranker_objective == "auto" else (args.ranker_objective,)
    config = PipelineConfig(
        mf=MFConfig(objective=args.objective, dim=args.dim, epochs=args.epochs, seed=args.seed,
                    show_progress=not args.no_progress),
        sequence=None if args.no_sequence_model else SequenceConfig(epochs=args.sequence_epochs, seed=args.seed),
        ranker=RankerConfig(seed=args.seed),
        ranker_objectives=objectives,
        history_length=args.history_length,
        baselines=not args.no_baselines,
        ablations=not args.no_ablations,
        report_budget=UNLIMITED if args.full_report else ReportBudget(),
        evaluation_users=args.evaluation_users or EVALUATION_USERS,
        feature_group_name=args.feature_group,
        user_history_group_name=args.user_history_group,
        show_progress=not args.no_progress,
        distribution=distribution,
    )
    # A training job's model goes to SM_MODEL_DIR (JobEnvironment.publish), built in a scratch folder first.
    out = args.out or (Path(tempfile.mkdtemp(prefix="twostage-job-")) if job and distribution.is_main else Path("out"))
    with process_group(distribution):
        if distribution.is_main:
            out.mkdir(parents=True, exist_ok=True)
        result = run(dataset, out, config)  # None on the other ranks, which write nothing
        if not args.no_replay:
            from training.replay import run_replay

            with load.stage("replay"):  # every rank trains the replay's model; rank 0 scores it
                found = run_replay(dataset, out, config, _ease_lambda(result.metrics if result else {}))
            if result is not None:
                result.metrics["replay"] = found
        if result is not None:
            for key, measured in (
                ("timings_s", load.seconds), ("cpu_s", load.cpu_seconds), ("memory_mb", load.memory_mb)
            ):
                result.metrics[key] = {**measured, **result.metrics.get(key, {})}
            metrics_path = out / "metrics.json"
            metrics_path.write_text(json.dumps(result.metrics, indent=2) + "\n", encoding="utf-8")
            plot_path = write_plots(result.metrics, out / PLOT_FILE)
            result.ranker_sample.to_csv(out / RANKER_SAMPLE_FILE, index=False)
            if job:
                job.publish(result.model_dir, [metrics_path, plot_path])
        barrier(distribution)  # the other ranks leave once rank 0 has written the model
    if result is None:
        return 0
    print(format_table(result.metrics))
    print("\ntwo-stage minus each baseline, paired over the test users:\n" + format_paired(result.metrics))
    print("\nstage 1 (test):\n" + format_stage_one(result.metrics))
    if result.metrics.get("ablations"):
        print("ablations (test):\n" + format_ablations(result.metrics))
    print("\nby the real gap since the user's last interaction (test):\n" + format_by_gap(result.metrics))
    print("\nreplay (trained up to a date, serving the weeks after):\n" + format_replay(result.metrics))
    print(f"\nmodel: {job.model_dir if job else result.model_dir}\nartifact: {result.tar_path}")
    print(f"metrics: {metrics_path}\nplots: {plot_path}")
    if distribution.is_distributed:
        print(f"trained by {distribution.world_size} processes on {distribution.n_hosts} node(s)")
    return 0


def _ease_lambda(metrics: dict[str, Any]) -> float | None:
    """The EASE lambda validation chose (``metrics["tuning"]["ease"]``: ``"lambda=300": ndcg``), if any."""
    tried = metrics.get("tuning", {}).get("ease")
    if not tried:
        return None
    return float(max(tried, key=tried.get).split("=", 1)[1])


def _dataset_options(args: argparse.Namespace, job: JobEnvironment | None) -> tuple[str, dict[str, Any]]:
    from training.job import channel_file

    name = args.dataset
    if job and name is None:
        channels = job.channels
        if "reviews" in channels:
            return "amazon", {"reviews": channel_file("reviews", channels["reviews"]),
                              "meta": channel_file("meta", channels["meta"]) if "meta" in channels else None}
        if "interactions" in channels:
            return "csv", {"interactions": channel_file("interactions", channels["interactions"]),
                           "items": channel_file("items", channels["items"]) if "items" in channels else None,
                           "columns": dict(c.split("=", 1) for c in args.column) or None}
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
        if args.n_interactions is not None:
            return name, {"n_interactions": args.n_interactions, "n_users": args.n_users, "n_items": args.n_items,
                          "seed": args.seed}
        return name, {"n_users": args.n_users or 2000, "n_items": args.n_items or 5000, "seed": args.seed}
    return name, {}


def _recommend(args: argparse.Namespace) -> int:
    from training.request_files import recommend_requests_file, recommend_users_file
    from twostage_rec.artifact import ArtifactError

    try:
        if args.requests is not None:
            lines, bad = recommend_requests_file(args.model, args.requests, args.out)
            print(f"wrote {lines} answers to {args.out} ({bad} line(s) with an error)")
        else:
            n = recommend_users_file(args.model, args.users, args.k, args.out)
            print(f"wrote {n} users to {args.out}")
    except ArtifactError as exc:
        raise DataError(str(exc)) from None
    return 0


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region", default=None, help="AWS region (default: $AWS_REGION / $AWS_DEFAULT_REGION)")
    parser.add_argument("--endpoint-url", default=None, help="e.g. the local Feature Store server")


def _region(args: argparse.Namespace) -> str:
    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise DataError("no region: pass --region or set AWS_REGION")
    return region


def _feature_store(args: argparse.Namespace) -> int:
    from training.feature_store import (
        create_item_feature_group,
        create_user_history_group,
        ingest_items,
        make_clients,
        seed_user_histories,
        user_history_schema,
    )
    from twostage_rec.artifact import load_artifact

    region = _region(args)
    artifact = load_artifact(args.model)
    history = user_history_schema(artifact.manifest, args.user_history_group)
    sm, runtime = make_clients(region, args.endpoint_url, concurrency=args.concurrency)
    if args.action in ("create", "setup"):
        name = create_item_feature_group(sm, artifact, role_arn=args.role_arn)
        print(f"feature group {name} ready")
        name = create_user_history_group(sm, history, role_arn=args.role_arn)
        print(f"feature group {name} ready")
    if args.action in ("ingest", "setup"):
        n = ingest_items(runtime, artifact, concurrency=args.concurrency)
        print(f"ingested {n} item records into {artifact.manifest.feature_store.feature_group_name}")
        report = seed_user_histories(runtime, artifact, history, concurrency=args.concurrency)
        print(f"seeded {report.users_stored} user histories into {history.feature_group_name}")
        return _report_failures(report)
    return 0


def _events(args: argparse.Namespace) -> int:
    from training.events import UserEvent, load_events_csv, record_events
    from training.feature_store import make_clients
    from twostage_rec.artifact import UserHistorySchema

    now = int(time.time())
    if args.file is not None:
        if args.user_id or args.item_id or args.timestamp:
            raise DataError("--file records a whole file: leave out --user-id, --item-id and --timestamp")
        try:
            events = load_events_csv(args.file, now)
        except DataError as exc:  # the whole file is checked before anything is written
            raise DataError(f"{exc}; nothing stored (0 events)") from None
    elif args.user_id and args.user_id.strip() and args.item_id and args.item_id.strip():
        timestamp = now if args.timestamp is None else _parse_timestamp(args.timestamp)
        events = [UserEvent(args.user_id, args.item_id, timestamp)]
    else:
        raise DataError("give --user-id and --item-id (one event) or --file PATH (a CSV of events)")
    if args.history_length < 1 or args.concurrency < 1 or args.max_attempts < 1:
        raise DataError("--history-length, --concurrency and --max-attempts must be at least 1")
    region = _region(args)  # after the input checks: bad input is reported even without a region
    try:
        _, runtime = make_clients(region, args.endpoint_url, max_attempts=args.max_attempts,
                                  concurrency=args.concurrency)
    except ValueError as exc:  # botocore's word on a malformed --endpoint-url
        raise DataError(f"--endpoint-url {args.endpoint_url!r}: {exc}") from None
    report = record_events(runtime, UserHistorySchema(args.feature_group), events, args.history_length,
                           concurrency=args.concurrency, show_progress=not args.no_progress)
    users = len({e.user_id for e in events})
    print(f"stored {report.events_stored} of {len(events)} events for {users} users in {args.feature_group}")
    return _report_failures(report)


def _parse_timestamp(text: str) -> int:
    """Epoch seconds (floored) or an ISO 8601 datetime (naive = UTC)."""
    from datetime import datetime, timezone

    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise DataError(f"--timestamp {text!r}: neither epoch seconds nor an ISO 8601 datetime") from None
        return int(moment.replace(tzinfo=moment.tzinfo or timezone.utc).timestamp())
    if not math.isfinite(seconds) or abs(seconds) > 2**53:
        raise DataError(f"--timestamp {text!r}: not a usable number of epoch seconds")
    return math.floor(seconds)


def _report_failures(report: Any, shown: int = 5) -> int:
    """Print the users not stored (the first few) and return the exit status."""
    for failure in report.failures[:shown]:
        print(f"error: user {failure.user_id!r}: {failure.events} event(s) not stored: {failure.message}",
              file=sys.stderr)
    if len(report.failures) > shown:
        print(f"error: ... and {len(report.failures) - shown} more users", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
