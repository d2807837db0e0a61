"""Batch recommendations with SageMaker Batch Transform: one request per input line, one answer per output line.

    python -m training transform (--model NAME | --model-tar S3_URI|PATH --image-uri URI --role-arn ARN [--bucket B])
        --input s3://bucket/requests/ --output s3://bucket/answers/ --instance-type ml.m5.large
        [--instance-count N] [--max-payload-mb 6] [--max-concurrent-transforms C] [--env KEY=VALUE ...]
        [--wait] --region R

Each input object under ``--input`` holds JSON lines, one ``/invocations`` single-user request
each (``{"user_id": "42", "top_k": 10, "as_of": 1700000000}``). SageMaker splits the objects at
line ends, sends the container mini-batches of whole lines (MultiRecord, at most --max-payload-mb
each, as application/jsonlines) and joins the answers line by line: ``--output`` gets one
``<input object>.out`` per input object, whose line i answers request i, or is an error object
``{"error", "message", "line"}`` when that request was bad. With --model-tar a Model is created
first (named like the job) and removed again if the job does not start.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from training.deployment import (
    DEFAULT_PREFIX,
    REGION_HELP,
    AwsClients,
    Command,
    DeploymentError,
    VariantSpec,
    create_model,
    deployment_name,
    model_data_url,
    model_key,
    one_line,
    parse_env,
    remove_models_and_config,
    s3_location,
    say,
)

JSON_LINES: Final = "application/jsonlines"
DEFAULT_MAX_PAYLOAD_MB: Final = 6
MAX_PAYLOAD_MB: Final = 100  # SageMaker's limit, also on MaxConcurrentTransforms x MaxPayloadInMB
DEFAULT_NAME: Final = "twostage-batch"
# The container refuses a body above MAX_REQUEST_BYTES (6 MiB by default): a job with larger
# mini-batches raises it to match, unless --env sets it.
REQUEST_LIMIT_ENV: Final = "MAX_REQUEST_BYTES"


@dataclass(frozen=True)
class TransformSpec:
    """Everything ``transform`` needs; ``model_name`` names an existing Model, else one is created."""

    job_name: str
    region: str
    input_uri: str
    output_uri: str
    instance_type: str
    instance_count: int = 1
    max_payload_mb: int = DEFAULT_MAX_PAYLOAD_MB
    max_concurrent_transforms: int | None = None  # None: SageMaker's default, 1 per instance
    model_name: str | None = None
    model_tar: Path | None = None
    model_data_url: str | None = None
    bucket: str | None = None
    prefix: str = DEFAULT_PREFIX
    image_uri: str | None = None
    role_arn: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    wait: bool = False
    wait_minutes: float = 1440


_SPEC_FIELDS: Final = {"input": "input_uri", "output": "output_uri"}  # option -> TransformSpec field


def transform_request(spec: TransformSpec, model_name: str) -> dict[str, Any]:
    """CreateTransformJob's arguments: JSON lines in, JSON lines out, line for line."""
    environment = dict(spec.environment)
    environment.setdefault(REQUEST_LIMIT_ENV, str(spec.max_payload_mb << 20))
    request: dict[str, Any] = {
        "TransformJobName": spec.job_name,
        "ModelName": model_name,
        "MaxPayloadInMB": spec.max_payload_mb,
        "BatchStrategy": "MultiRecord",
        "Environment": environment,
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": spec.input_uri}},
            "ContentType": JSON_LINES,
            "SplitType": "Line",
        },
        "TransformOutput": {"S3OutputPath": spec.output_uri, "Accept": JSON_LINES, "AssembleWith": "Line"},
        "TransformResources": {"InstanceType": spec.instance_type, "InstanceCount": spec.instance_count},
    }
    if spec.max_concurrent_transforms is not None:
        request["MaxConcurrentTransforms"] = spec.max_concurrent_transforms
    return request


def start_transform(spec: TransformSpec, clients: AwsClients) -> str:
    """Create the Model if asked, then the transform job; returns the job's name.

    A Model created here is deleted again if the job does not start.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    model_name = spec.model_name
    created: list[str] = []
    if model_name is None:
        assert spec.image_uri is not None and spec.role_arn is not None  # transform_command checked them
        archive = VariantSpec(spec.job_name, model_tar=spec.model_tar, model_data_url=spec.model_data_url)
        model_name = spec.job_name
        data_url = model_data_url(clients.s3, archive, spec.bucket, model_key(spec.prefix, spec.job_name))
        create_model(clients.sagemaker, model_name, spec.image_uri, data_url, spec.role_arn,
                     {"AWS_REGION": spec.region})
        created.append(model_name)
    say(f"starting transform job {spec.job_name}: {spec.input_uri} -> {spec.output_uri} with model {model_name} "
        f"({spec.instance_count} x {spec.instance_type})")
    try:
        clients.sagemaker.create_transform_job(**transform_request(spec, model_name))
    except (ClientError, BotoCoreError):
        if created:
            remove_models_and_config(clients.sagemaker, None, created)
        raise
    return spec.job_name


def wait_for_transform(sagemaker: Any, job_name: str, minutes: float) -> dict[str, Any]:
    """Wait until the job ends; return its description if Completed, else raise with its FailureReason."""
    from botocore.exceptions import WaiterError

    try:
        sagemaker.get_waiter("transform_job_completed_or_stopped").wait(
            TransformJobName=job_name, WaiterConfig={"Delay": 30, "MaxAttempts": max(1, int(minutes * 2))}
        )
    except WaiterError:
        pass  # Failed, or still running at the deadline: the description below says which
    described = sagemaker.describe_transform_job(TransformJobName=job_name)
    status = described["TransformJobStatus"]
    if status != "Completed":
        reason = one_line(described.get("FailureReason") or "no failure reason given")
        detail = f"still {status} after {minutes:g} minutes" if status in ("InProgress", "Stopping") else status
        raise DeploymentError(f"transform job {job_name} {detail}: {reason}")
    return dict(described)


def add_parser(sub: Any) -> None:
    job = sub.add_parser("transform", help="batch recommendations: a SageMaker Batch Transform over JSON lines",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = job.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="an existing SageMaker Model (e.g. one that deploy created)")
    model.add_argument("--model-tar", help="a model.tar.gz (s3:// URL, or a local path with --bucket): creates a "
                                           "Model first, which needs --image-uri and --role-arn")
    job.add_argument("--image-uri", help="the serving image, with --model-tar")
    job.add_argument("--role-arn", help="SageMaker execution role ARN, with --model-tar")
    job.add_argument("--bucket", help="S3 bucket to upload a local --model-tar to")
    job.add_argument("--prefix", default=DEFAULT_PREFIX,
                     help=f"S3 key prefix for the upload (default {DEFAULT_PREFIX})")
    job.add_argument("--input", required=True, metavar="S3_URI", help="s3:// prefix of the JSON-lines request files")
    job.add_argument("--output", required=True, metavar="S3_URI", help="s3:// prefix for the answers (<file>.out)")
    job.add_argument("--instance-type", required=True, help="e.g. ml.m5.large or ml.c5.xlarge")
    job.add_argument("--instance-count", type=int, default=1, help="default 1")
    job.add_argument("--max-payload-mb", type=int, default=DEFAULT_MAX_PAYLOAD_MB,
                     help=f"largest mini-batch of lines per request, 1..{MAX_PAYLOAD_MB} MB (default "
                          f"{DEFAULT_MAX_PAYLOAD_MB}); the job sets the container's {REQUEST_LIMIT_ENV} to match")
    job.add_argument("--max-concurrent-transforms", type=int,
                     help="requests in flight per instance (default: SageMaker's: 1, as the container has no "
                          "/execution-parameters); the instance's worker count keeps every worker busy")
    job.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="container environment for the job (e.g. FEATURE_SOURCE=embedded)")
    job.add_argument("--name", default=DEFAULT_NAME,
                     help=f"base name: the job (and a created Model) is <name>-<UTC timestamp> "
                          f"(default {DEFAULT_NAME})")
    job.add_argument("--wait", action="store_true", help="wait for the job; print its final status and output")
    job.add_argument("--wait-minutes", type=float, default=1440, help="with --wait: give up after this (default 1440)")
    job.add_argument("--region", help=REGION_HELP)


def transform_command(args: argparse.Namespace, region: str) -> Command:
    """Validate ``transform`` (no AWS call) into the command to run."""
    input_bucket, input_key = s3_location(args.input, "--input")
    output_bucket, output_key = s3_location(args.output, "--output")
    # S3Prefix input is every key that starts with the input's key, folder or not.
    if input_bucket == output_bucket and output_key.startswith(input_key):
        raise DeploymentError(f"--output {args.output!r} is inside --input {args.input!r}: a second run would read "
                              "the answers as requests")
    if args.instance_count < 1:
        raise DeploymentError("--instance-count must be at least 1")
    if not 1 <= args.max_payload_mb <= MAX_PAYLOAD_MB:
        raise DeploymentError(f"--max-payload-mb must be between 1 and {MAX_PAYLOAD_MB}")
    concurrent = args.max_concurrent_transforms
    if concurrent is not None and (concurrent < 1 or concurrent * args.max_payload_mb > MAX_PAYLOAD_MB):
        raise DeploymentError(f"--max-concurrent-transforms must be at least 1, and times --max-payload-mb at most "
                              f"{MAX_PAYLOAD_MB} (SageMaker's limit)")
    environment = parse_env(args.env)
    model_tar = model_url = None
    if args.model_tar is not None:
        if not (args.image_uri and args.role_arn):
            raise DeploymentError("--model-tar creates a Model: give --image-uri and --role-arn too")
        if args.model_tar.startswith("s3://"):
            s3_location(args.model_tar, "--model-tar")
            model_url = args.model_tar
        else:
            model_tar = Path(args.model_tar)
            if not args.bucket:
                raise DeploymentError("a local --model-tar needs --bucket (or give its s3:// URL)")
            if not model_tar.is_file():
                raise DeploymentError(f"{model_tar}: model archive not found")
    # The options that map one to one onto TransformSpec's fields (--input and --output as *_uri).
    same = ("input", "output", "instance_type", "instance_count", "max_payload_mb", "bucket", "prefix", "image_uri",
            "role_arn", "wait", "wait_minutes")
    spec = TransformSpec(
        job_name=deployment_name(args.name), region=region, max_concurrent_transforms=concurrent, model_name=args.model,
        model_tar=model_tar, model_data_url=model_url, environment=environment,
        **{_SPEC_FIELDS.get(name, name): getattr(args, name) for name in same},
    )

    def run(clients: AwsClients) -> int:
        job = start_transform(spec, clients)
        print(job)
        if spec.wait:
            described = wait_for_transform(clients.sagemaker, job, spec.wait_minutes)
            print(f"{described['TransformJobStatus']} {described['TransformOutput']['S3OutputPath']}")
        return 0

    return Command(run)
