"""Command line of the SageMaker endpoint commands: deploy, invoke, teardown, rollback, transform.

    python -m training deploy --name recs --image-uri ACCOUNT.dkr.ecr.REGION.amazonaws.com/twostage-rec:SHA \\
        --model-tar out/model.tar.gz --bucket my-bucket --role-arn arn:aws:iam::ACCOUNT:role/SageMakerRole \\
        --region eu-west-1 --feature-group-name items [--user-history-group-name user-history]
        [--variant NAME=MODEL_TAR:WEIGHT ...] [--data-capture s3://bucket/capture [--capture-percent 10]]
        [--autoscale 1 4 --target-invocations 300]
    python -m training deploy --update ENDPOINT --model-tar out/model.tar.gz --bucket my-bucket --region eu-west-1
        [--traffic canary|linear|all-at-once] [--latency-p99-ms 500] [--gate-tolerance 0.005] [--force]
    python -m training rollback ENDPOINT --region eu-west-1
    python -m training invoke --endpoint recs-20260101-120000 --user-id 42 [--target-variant b] --region eu-west-1
    python -m training transform --model NAME --input s3://bucket/requests/ --output s3://bucket/answers/ \\
        --instance-type ml.m5.large --region eu-west-1 [--wait]
    python -m training teardown --endpoint-name recs-20260101-120000 --region eu-west-1

Each command's --help has its options. Exit status: 0 ok, 1 an AWS failure (one line on stderr),
2 bad arguments (nothing sent to AWS), 3 ``deploy --update`` refused by the evaluation gate.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from training import endpoint_update, transform
from training.deployment import (
    DEFAULT_CAPTURE_PERCENT,
    DEFAULT_INSTANCE_TYPE,
    DEFAULT_PREFIX,
    MAX_NAME,
    MAX_VARIANTS,
    NAME_RE,
    REGION_HELP,
    VARIANT,
    Autoscaling,
    AwsClients,
    Command,
    DataCapture,
    DeploymentError,
    DeploymentSpec,
    VariantSpec,
    deploy,
    deployment_name,
    endpoint_error,
    first_user_id,
    invoke,
    model_names,
    parse_env,
    s3_location,
    say,
    teardown,
)
from training.endpoint_update import MAX_EXECUTION_S, PROVISIONING_S, TrafficPolicy, UpdateSpec, update_endpoint


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "deploy", help="create an endpoint (or --update a live one); wait; invoke once",
        description="Create a new endpoint, or with --update roll new models onto a live one "
                    "(blue/green with alarms and an evaluation gate; see training/endpoint_update.py).",
    )
    up.add_argument("--name", help="new endpoint: base name; resources are named <name>-<UTC timestamp>")
    up.add_argument("--image-uri",
                    help="the serving image in ECR (see build_and_push.sh); with --update default: the live model's")
    up.add_argument("--role-arn", help="SageMaker execution role ARN; with --update default: the live model's")
    up.add_argument("--region", help=REGION_HELP)
    source = up.add_mutually_exclusive_group()
    source.add_argument("--model-tar", type=Path, help="local model.tar.gz to upload (needs --bucket)")
    source.add_argument("--model-data-url", help="s3:// URL of an uploaded model.tar.gz")
    up.add_argument("--variant", action="append", default=[], metavar="NAME=MODEL_TAR:WEIGHT",
                    help="a production variant (repeat for an A/B split): its model.tar.gz (local path, needs "
                         "--bucket, or s3:// URL) and its traffic weight, e.g. --variant a=out/a.tar.gz:0.9 "
                         "--variant b=s3://bucket/b/model.tar.gz:0.1; instead of --model-tar/--model-data-url")
    up.add_argument("--bucket", help="S3 bucket for local model archives")
    up.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"S3 key prefix (default {DEFAULT_PREFIX})")
    up.add_argument("--instance-type",
                    help=f"per variant (default {DEFAULT_INSTANCE_TYPE}; with --update: the live variant's)")
    up.add_argument("--instance-count", type=int,
                    help="instances per variant (default 1; with --update: the live variant's current count)")
    up.add_argument("--data-capture", metavar="S3_URI",
                    help="capture requests and answers (JSON) under this s3:// prefix; with --update the live "
                         "config's capture is kept unless this is given")
    up.add_argument("--capture-percent", type=int, default=DEFAULT_CAPTURE_PERCENT,
                    help=f"share of requests captured, 1..100 (default {DEFAULT_CAPTURE_PERCENT}: a sample is "
                         "enough to monitor; 100 keeps every request for a replay)")
    up.add_argument("--feature-group-name", help="serve item features from this Feature Store group")
    up.add_argument("--user-history-group-name",
                    help="read users' fresh history from this Feature Store group (USER_HISTORY_FEATURE_GROUP_NAME)")
    up.add_argument("--feature-source", choices=["embedded", "featurestore", "cached"], help="FEATURE_SOURCE")
    up.add_argument("--workers", type=int, help="SAGEMAKER_MODEL_SERVER_WORKERS (default: one per vCPU)")
    up.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra container environment")
    up.add_argument("--sample-user", help="user id for the test invocation (default: the model's first user)")
    up.add_argument("--autoscale", nargs=2, type=int, metavar=("MIN", "MAX"),
                    help="new endpoint: instance count range of each variant")
    up.add_argument("--target-invocations", type=float, default=200.0,
                    help="autoscaling target, invocations per instance per minute (default 200)")
    up.add_argument("--wait-minutes", type=int, default=30,
                    help="how long to wait for InService (default 30; with --update on top of the traffic shifting)")
    endpoint_update.add_update_arguments(up)
    down = sub.add_parser("teardown", help="delete autoscaling, alarms, endpoint, endpoint config and models")
    down.add_argument("--endpoint-name", required=True)
    down.add_argument("--region", help=REGION_HELP)
    down.add_argument("--no-wait", action="store_true", help="do not wait for the endpoint to be deleted")
    call = sub.add_parser("invoke", help="send one recommendation request to an endpoint and print the answer")
    call.add_argument("--endpoint", required=True)
    call.add_argument("--user-id", required=True)
    call.add_argument("--top-k", type=int, default=10, help="default 10")
    call.add_argument("--target-variant", help="send the request to this production variant")
    call.add_argument("--as-of", type=int, help="answer as of this epoch second (the request's as_of)")
    call.add_argument("--region", help=REGION_HELP)
    endpoint_update.add_rollback_parser(sub)
    transform.add_parser(sub)
    return parser


def environment_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The container environment that ``deploy``'s flags ask for (``--env`` and the named settings)."""
    environment = parse_env(args.env)
    if args.feature_group_name:
        environment["FEATURE_GROUP_NAME"] = args.feature_group_name
    if args.user_history_group_name:
        environment["USER_HISTORY_FEATURE_GROUP_NAME"] = args.user_history_group_name
    if args.feature_source:
        environment["FEATURE_SOURCE"] = args.feature_source
    if args.workers is not None:
        if args.workers < 1:
            raise DeploymentError("--workers must be at least 1")
        environment["SAGEMAKER_MODEL_SERVER_WORKERS"] = str(args.workers)
    return environment


def parse_variant(text: str) -> VariantSpec:
    """``NAME=MODEL_TAR:WEIGHT``; MODEL_TAR is a local path or an s3:// URL (split at the last colon)."""
    name, sep, rest = text.partition("=")
    source, colon, weight_text = rest.rpartition(":")
    usage = f"--variant {text!r}: expected NAME=MODEL_TAR:WEIGHT (MODEL_TAR a local model.tar.gz or an s3:// URL)"
    if not sep or not colon or not source:
        raise DeploymentError(usage)
    if not NAME_RE.match(name) or len(name) > MAX_NAME:
        raise DeploymentError(f"--variant {text!r}: the name must be letters, digits and hyphens")
    try:
        weight = float(weight_text)
    except ValueError:
        raise DeploymentError(usage) from None
    if not math.isfinite(weight) or weight < 0:
        raise DeploymentError(f"--variant {text!r}: the weight must be a number >= 0")
    if source.startswith("s3://"):
        s3_location(source, "--variant")
        return VariantSpec(name, model_data_url=source, weight=weight)
    return VariantSpec(name, model_tar=Path(source), weight=weight)


def variants_from_args(args: argparse.Namespace) -> tuple[VariantSpec, ...]:
    """The variants of ``--variant``, or the one variant of ``--model-tar``/``--model-data-url``."""
    if args.variant and (args.model_tar is not None or args.model_data_url is not None):
        raise DeploymentError("give either --variant (one or more) or --model-tar/--model-data-url, not both")
    if not args.variant:
        if args.model_tar is None and args.model_data_url is None:
            raise DeploymentError("give the model: --model-tar, --model-data-url or --variant")
        if args.model_data_url is not None:
            s3_location(args.model_data_url, "--model-data-url")
        return (VariantSpec(VARIANT, model_tar=args.model_tar, model_data_url=args.model_data_url),)
    variants = tuple(parse_variant(text) for text in args.variant)
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise DeploymentError(f"--variant names must differ; got {', '.join(names)}")
    if len(variants) > MAX_VARIANTS:
        raise DeploymentError(f"at most {MAX_VARIANTS} variants per endpoint")
    if sum(v.weight for v in variants) <= 0:
        raise DeploymentError("--variant weights must not all be 0")
    return variants


def data_capture_from_args(args: argparse.Namespace) -> DataCapture | None:
    if not 1 <= args.capture_percent <= 100:
        raise DeploymentError("--capture-percent must be between 1 and 100")
    if args.data_capture is None:
        return None
    s3_location(args.data_capture, "--data-capture")
    return DataCapture(args.data_capture, args.capture_percent)


def check_local_archives(variants: Sequence[VariantSpec], bucket: str | None, flag: str) -> None:
    """Local archives (given with ``flag``) need ``--bucket`` and must exist before anything is created."""
    local = [v.model_tar for v in variants if v.model_tar is not None]
    if local and not bucket:
        raise DeploymentError(f"{flag} needs --bucket")
    for path in local:
        if not path.is_file():
            raise DeploymentError(f"{path}: model archive not found")


def sample_user(args: argparse.Namespace, variants: Sequence[VariantSpec]) -> str:
    """``--sample-user``, else the first user of the first local archive, else a placeholder."""
    if args.sample_user is not None:
        return str(args.sample_user)
    for variant in variants:
        if variant.model_tar is not None and (user := first_user_id(variant.model_tar)):
            return user
    return DeploymentSpec.sample_user_id


def spec_from_args(args: argparse.Namespace, region: str, now: datetime | None = None) -> DeploymentSpec:
    """Validate the ``deploy`` arguments (a new endpoint) into a :class:`DeploymentSpec`."""
    missing = [flag for flag, value in (("--name", args.name), ("--image-uri", args.image_uri),
                                        ("--role-arn", args.role_arn)) if not value]
    if missing:
        raise DeploymentError(f"a new endpoint needs {', '.join(missing)} (or --update ENDPOINT to update one)")
    name = deployment_name(args.name, now)
    environment = environment_from_args(args)
    instance_count = 1 if args.instance_count is None else args.instance_count
    if instance_count < 1:
        raise DeploymentError("--instance-count must be at least 1")
    variants = variants_from_args(args)
    model_names(name, [v.name for v in variants])
    check_local_archives(variants, args.bucket, "--variant" if args.variant else "--model-tar")
    data_capture = data_capture_from_args(args)
    autoscaling = None
    if args.autoscale:
        low, high = args.autoscale
        if not 1 <= low <= high:
            raise DeploymentError(f"--autoscale {low} {high}: need 1 <= MIN <= MAX")
        if not low <= instance_count <= high:
            raise DeploymentError(f"--instance-count {instance_count} is outside --autoscale {low} {high}")
        if args.target_invocations <= 0:
            raise DeploymentError("--target-invocations must be positive")
        autoscaling = Autoscaling(low, high, args.target_invocations)
    return DeploymentSpec(
        name=name,
        image_uri=args.image_uri,
        role_arn=args.role_arn,
        region=region,
        variants=variants,
        bucket=args.bucket,
        prefix=args.prefix,
        instance_type=args.instance_type or DEFAULT_INSTANCE_TYPE,
        instance_count=instance_count,
        environment=environment,
        autoscaling=autoscaling,
        data_capture=data_capture,
        sample_user_id=sample_user(args, variants),
        wait_minutes=args.wait_minutes,
    )


def _command(args: argparse.Namespace, region: str) -> Command:
    """Validate the arguments (no AWS call) into the command to run."""
    if args.command == "deploy" and args.update:
        return _update_command(args, region)
    if args.command == "deploy":
        spec = spec_from_args(args, region)

        def run_deploy(clients: AwsClients) -> int:
            for answer in deploy(spec, clients):
                print(answer)
            print(spec.name)
            return 0

        hint = (f"remove what was created with: python -m training teardown --endpoint-name {spec.name} "
                f"--region {region}")
        return Command(run_deploy, hint)
    if args.command == "rollback":
        return endpoint_update.rollback_command(args)
    if args.command == "transform":
        return transform.transform_command(args, region)
    if args.command == "invoke":
        return _invoke_command(args)
    return Command(lambda clients: _teardown(clients, args.endpoint_name, not args.no_wait))


def _update_command(args: argparse.Namespace, region: str) -> Command:
    """Validate ``deploy --update`` (no AWS call) into the command to run."""
    for flag, value in (("--name", args.name), ("--autoscale", args.autoscale)):
        if value:
            raise DeploymentError(f"{flag} is for a new endpoint; --update keeps the live endpoint's name and "
                                  "autoscaling")
    if args.instance_count is not None and args.instance_count < 1:
        raise DeploymentError("--instance-count must be at least 1")
    traffic = traffic_from_args(args)
    if not (args.latency_p99_ms > 0 and math.isfinite(args.latency_p99_ms)):
        raise DeploymentError("--latency-p99-ms must be a positive number of milliseconds")
    if not (args.gate_tolerance >= 0 and math.isfinite(args.gate_tolerance)):
        raise DeploymentError("--gate-tolerance must be a number >= 0")
    variants = variants_from_args(args)
    check_local_archives(variants, args.bucket, "--variant" if args.variant else "--model-tar")
    spec = UpdateSpec(
        endpoint=args.update,
        region=region,
        variants=variants,
        replaces_only_variant=not args.variant,
        image_uri=args.image_uri,
        role_arn=args.role_arn,
        bucket=args.bucket,
        prefix=args.prefix,
        instance_type=args.instance_type,
        instance_count=args.instance_count,
        environment=environment_from_args(args),
        data_capture=data_capture_from_args(args),
        traffic=traffic,
        latency_p99_ms=args.latency_p99_ms,
        gate_tolerance=args.gate_tolerance,
        force=args.force,
        wait=not args.no_wait,
        wait_minutes=args.wait_minutes,
        sample_user_id=sample_user(args, variants),
    )

    def run(clients: AwsClients) -> int:
        for answer in update_endpoint(spec, clients):
            print(answer)
        print(spec.endpoint)
        return 0

    return Command(run)


def traffic_from_args(args: argparse.Namespace) -> TrafficPolicy:
    """``--traffic``, ``--step-percent`` and ``--wait-interval-s``, checked against SageMaker's limits."""
    low = 10 if args.traffic == "linear" else 1
    if args.traffic != "all-at-once" and not low <= args.step_percent <= 50:
        raise DeploymentError(f"--step-percent for --traffic {args.traffic} must be between {low} and 50")
    if not 0 <= args.wait_interval_s <= 3600:
        raise DeploymentError("--wait-interval-s must be between 0 and 3600")
    traffic = TrafficPolicy(args.traffic, args.step_percent, args.wait_interval_s)
    if traffic.baking_s + PROVISIONING_S > MAX_EXECUTION_S:
        raise DeploymentError(f"--traffic {args.traffic}: {traffic.shifts} shifts x {args.wait_interval_s} s baking "
                              f"plus {PROVISIONING_S} s to provision exceed SageMaker's {MAX_EXECUTION_S} s limit on "
                              "a deployment; use a larger --step-percent or a shorter --wait-interval-s")
    return traffic


def _invoke_command(args: argparse.Namespace) -> Command:
    if args.top_k < 1:
        raise DeploymentError("--top-k must be at least 1")

    def run_invoke(clients: AwsClients) -> int:
        print(invoke(clients.runtime, args.endpoint, args.user_id, args.top_k, args.target_variant, args.as_of))
        return 0

    return Command(run_invoke)


def _teardown(clients: AwsClients, endpoint: str, wait: bool) -> int:
    for line in teardown(clients, endpoint, wait=wait):
        say(f"deleted {line}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Every deployment command; returns the exit status.

    0 ok, 1 AWS failure (one line), 2 bad arguments, 3 ``deploy --update`` refused by the
    evaluation gate. ``deploy`` prints the sample answers, then the endpoint name, on stdout;
    progress goes to stderr.
    """
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    from training.evaluation_gate import GateRefusal

    args = _parser().parse_args(argv)
    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        print("error: no region; pass --region or set AWS_REGION", file=sys.stderr)
        return 2
    try:
        command = _command(args, region)
    except DeploymentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    clients = AwsClients.create(region)
    try:
        return command.run(clients)
    except GateRefusal as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 3
    except ClientError as exc:
        problem = endpoint_error(exc)
    except (DeploymentError, BotoCoreError, Boto3Error) as exc:  # no credentials, no connection, S3 upload
        problem = str(exc)
    print(f"error: {problem}", file=sys.stderr)
    if command.on_failure:
        print(command.on_failure, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
