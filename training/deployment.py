"""Deploy the serving image and a model to a SageMaker real-time endpoint, and tear it down.

    python -m training deploy --name recs --image-uri ACCOUNT.dkr.ecr.REGION.amazonaws.com/twostage-rec:SHA \\
        --model-tar out/model.tar.gz --bucket my-bucket --role-arn arn:aws:iam::ACCOUNT:role/SageMakerRole \\
        --region eu-west-1 --feature-group-name items [--user-history-group-name user-history]
        [--autoscale 1 4 --target-invocations 300]
    python -m training teardown --endpoint-name recs-20260101-120000 --region eu-west-1

``deploy`` uploads model.tar.gz to S3, creates the Model, EndpointConfig and Endpoint (all three
named ``<name>-<UTC timestamp>``), waits until the endpoint is InService, optionally registers
target-tracking autoscaling on invocations per instance, and invokes the endpoint once.
``teardown`` removes the autoscaling target, the endpoint, its endpoint config and its models;
the model data stays in S3. boto3 only; the region is always passed explicitly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

VARIANT: Final = "AllTraffic"
SCALABLE_DIMENSION: Final = "sagemaker:variant:DesiredInstanceCount"
DEFAULT_INSTANCE_TYPE: Final = "ml.c7i.large"
DEFAULT_PREFIX: Final = "twostage-rec/models"
# twostage_rec.artifact.USER_ID_FILES[:2]: the ids' bytes and offsets, read straight from the archive.
USER_ID_DATA_FILE: Final = "user_id_data.npy"
USER_ID_OFFSETS_FILE: Final = "user_id_offsets.npy"
_NAME_RE: Final = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")  # SageMaker's resource name pattern
_STAMP_FORMAT: Final = "%Y%m%d-%H%M%S"
_MAX_NAME: Final = 63


class DeploymentError(Exception):
    """A deployment step failed; the message is one line for the operator."""


@dataclass(frozen=True)
class Autoscaling:
    """Target tracking on the variant's instance count."""

    min_capacity: int
    max_capacity: int
    target_invocations: float  # SageMakerVariantInvocationsPerInstance, per minute
    scale_in_cooldown_s: int = 300
    scale_out_cooldown_s: int = 60


@dataclass(frozen=True)
class DeploymentSpec:
    """Everything ``deploy`` needs; ``model_tar`` is uploaded unless ``model_data_url`` is given.

    ``name`` is the full resource name (see :func:`deployment_name`) shared by the model, the
    endpoint config and the endpoint.
    """

    name: str
    image_uri: str
    role_arn: str
    region: str
    model_tar: Path | None = None
    model_data_url: str | None = None
    bucket: str | None = None
    prefix: str = DEFAULT_PREFIX
    instance_type: str = DEFAULT_INSTANCE_TYPE
    instance_count: int = 1
    environment: Mapping[str, str] = field(default_factory=dict)
    autoscaling: Autoscaling | None = None
    sample_user_id: str = "sample-user"  # an unknown user still gets the popularity fallback
    wait_minutes: int = 30


@dataclass(frozen=True)
class AwsClients:
    """The four boto3 clients a deployment uses, all in one explicit region."""

    s3: Any
    sagemaker: Any
    runtime: Any
    autoscaling: Any

    @classmethod
    def create(cls, region: str) -> AwsClients:
        import boto3

        session = boto3.session.Session(region_name=region)
        return cls(
            s3=session.client("s3", region_name=region),
            sagemaker=session.client("sagemaker", region_name=region),
            runtime=session.client("sagemaker-runtime", region_name=region),
            autoscaling=session.client("application-autoscaling", region_name=region),
        )


def deployment_name(name: str, now: datetime | None = None) -> str:
    """``<name>-<UTC YYYYmmdd-HHMMSS>``, valid as a SageMaker model, config and endpoint name."""
    stamp = (now or datetime.now(timezone.utc)).strftime(_STAMP_FORMAT)
    full = f"{name}-{stamp}"
    if not _NAME_RE.match(name) or len(full) > _MAX_NAME:
        raise DeploymentError(
            f"--name {name!r}: use letters, digits and hyphens, at most {_MAX_NAME - len(stamp) - 1} characters"
        )
    return full


def deploy(spec: DeploymentSpec, clients: AwsClients) -> str:
    """Upload, create model, endpoint config and endpoint; wait; autoscale; invoke once.

    Returns the sample answer's body.
    """
    name = spec.name
    model_data_url = spec.model_data_url or upload_model(clients.s3, spec, name)
    environment = {"AWS_REGION": spec.region, **spec.environment}
    _say(f"creating model {name} ({spec.image_uri}, {model_data_url})")
    clients.sagemaker.create_model(
        ModelName=name,
        ExecutionRoleArn=spec.role_arn,
        PrimaryContainer={"Image": spec.image_uri, "ModelDataUrl": model_data_url, "Environment": environment},
    )
    clients.sagemaker.create_endpoint_config(
        EndpointConfigName=name,
        ProductionVariants=[
            {
                "VariantName": VARIANT,
                "ModelName": name,
                "InstanceType": spec.instance_type,
                "InitialInstanceCount": spec.instance_count,
            }
        ],
    )
    _say(f"creating endpoint {name} ({spec.instance_count} x {spec.instance_type}); waiting for InService")
    clients.sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    wait_in_service(clients.sagemaker, name, spec.wait_minutes)
    if spec.autoscaling:
        register_autoscaling(clients.autoscaling, name, spec.autoscaling)
    _say(f"endpoint {name} is InService; invoking it for user {spec.sample_user_id!r}")
    return invoke(clients.runtime, name, spec.sample_user_id)


def upload_model(s3: Any, spec: DeploymentSpec, name: str) -> str:
    """Upload ``spec.model_tar`` to ``s3://bucket/prefix/<name>/model.tar.gz`` and return that URL."""
    if spec.model_tar is None or spec.bucket is None:
        raise DeploymentError("give --model-data-url, or --model-tar with --bucket")
    if not spec.model_tar.is_file():
        raise DeploymentError(f"{spec.model_tar}: model archive not found")
    key = f"{spec.prefix.strip('/')}/{name}/model.tar.gz".lstrip("/")
    _say(f"uploading {spec.model_tar} to s3://{spec.bucket}/{key}")
    s3.upload_file(str(spec.model_tar), spec.bucket, key)
    return f"s3://{spec.bucket}/{key}"


def wait_in_service(sagemaker: Any, endpoint: str, minutes: int) -> None:
    """Wait with the boto3 waiter; on failure raise with the endpoint's FailureReason."""
    from botocore.exceptions import WaiterError

    waiter = sagemaker.get_waiter("endpoint_in_service")
    try:
        waiter.wait(EndpointName=endpoint, WaiterConfig={"Delay": 30, "MaxAttempts": max(1, minutes * 2)})
    except WaiterError:
        described = sagemaker.describe_endpoint(EndpointName=endpoint)
        reason = described.get("FailureReason") or "no failure reason given"
        raise DeploymentError(f"endpoint {endpoint} is {described.get('EndpointStatus')}, not InService: {reason}") from None


def register_autoscaling(autoscaling: Any, endpoint: str, policy: Autoscaling) -> None:
    """Target tracking on ``SageMakerVariantInvocationsPerInstance`` for the endpoint's variant."""
    resource_id = scalable_resource_id(endpoint)
    _say(f"autoscaling {resource_id}: {policy.min_capacity}..{policy.max_capacity} instances, "
         f"target {policy.target_invocations:g} invocations/instance/minute")
    autoscaling.register_scalable_target(
        ServiceNamespace="sagemaker",
        ResourceId=resource_id,
        ScalableDimension=SCALABLE_DIMENSION,
        MinCapacity=policy.min_capacity,
        MaxCapacity=policy.max_capacity,
    )
    autoscaling.put_scaling_policy(
        PolicyName=f"{endpoint}-invocations",
        ServiceNamespace="sagemaker",
        ResourceId=resource_id,
        ScalableDimension=SCALABLE_DIMENSION,
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": float(policy.target_invocations),
            "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
            "ScaleInCooldown": policy.scale_in_cooldown_s,
            "ScaleOutCooldown": policy.scale_out_cooldown_s,
        },
    )


def scalable_resource_id(endpoint: str) -> str:
    """Application Auto Scaling's id for the endpoint's only variant."""
    return f"endpoint/{endpoint}/variant/{VARIANT}"


def invoke(runtime: Any, endpoint: str, user_id: str, top_k: int = 5) -> str:
    """One recommendation request through sagemaker-runtime; returns the response body as text."""
    response = runtime.invoke_endpoint(
        EndpointName=endpoint,
        ContentType="application/json",
        Accept="application/json",
        Body=json.dumps({"user_id": user_id, "top_k": top_k}).encode("utf-8"),
    )
    return response["Body"].read().decode("utf-8", errors="replace")


def teardown(clients: AwsClients, endpoint: str, wait: bool = True) -> list[str]:
    """Delete autoscaling, the endpoint, its config and its models; missing pieces are skipped.

    Returns what was deleted, e.g. ``["endpoint recs-...", "model recs-..."]``.
    """
    deleted: list[str] = []
    if _absent_ok(
        lambda: clients.autoscaling.deregister_scalable_target(
            ServiceNamespace="sagemaker", ResourceId=scalable_resource_id(endpoint), ScalableDimension=SCALABLE_DIMENSION
        )
    ):
        deleted.append(f"autoscaling target {scalable_resource_id(endpoint)}")  # its policies go with it
    config_name = endpoint
    described = _absent_ok(lambda: clients.sagemaker.describe_endpoint(EndpointName=endpoint))
    if described:
        config_name = described["EndpointConfigName"]
        clients.sagemaker.delete_endpoint(EndpointName=endpoint)
        deleted.append(f"endpoint {endpoint}")
        if wait:
            clients.sagemaker.get_waiter("endpoint_deleted").wait(
                EndpointName=endpoint, WaiterConfig={"Delay": 15, "MaxAttempts": 80}
            )
    model_names = [endpoint]
    config = _absent_ok(lambda: clients.sagemaker.describe_endpoint_config(EndpointConfigName=config_name))
    if config:
        model_names = [v["ModelName"] for v in config["ProductionVariants"]]
        clients.sagemaker.delete_endpoint_config(EndpointConfigName=config_name)
        deleted.append(f"endpoint config {config_name}")
    for model in dict.fromkeys(model_names):
        if _absent_ok(lambda: clients.sagemaker.delete_model(ModelName=model)) is not None:
            deleted.append(f"model {model}")
    return deleted


def _absent_ok(call: Any) -> Any:
    """Run ``call``; return None if AWS says the resource does not exist.

    SageMaker reports a missing resource as a ValidationException "Could not find ...";
    Application Auto Scaling as ObjectNotFoundException (moto: a ValidationException).
    """
    from botocore.exceptions import ClientError

    try:
        result = call()
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code"), str(error.get("Message", ""))
        if code == "ObjectNotFoundException" or (
            code == "ValidationException" and ("Could not find" in message or "No scalable target" in message)
        ):
            return None
        raise
    return result if result is not None else {}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def first_user_id(model_tar: Path) -> str | None:
    """The first user of a model archive, to invoke the new endpoint with a known user."""
    import io

    import numpy as np

    try:
        with tarfile.open(model_tar, "r:gz") as archive:
            data, offsets = (
                np.load(io.BytesIO(archive.extractfile(name).read()), allow_pickle=False)  # type: ignore[union-attr]
                for name in (USER_ID_DATA_FILE, USER_ID_OFFSETS_FILE)
            )
    except (OSError, KeyError, AttributeError, tarfile.TarError, ValueError):
        return None
    if len(offsets) < 2:
        return None
    return bytes(data[offsets[0] : offsets[1]]).decode("utf-8", errors="replace")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("deploy", help="create model, endpoint config and endpoint; wait; invoke once")
    up.add_argument("--name", required=True, help="base name; resources are named <name>-<UTC timestamp>")
    up.add_argument("--image-uri", required=True, help="the serving image in ECR (see build_and_push.sh)")
    up.add_argument("--role-arn", required=True, help="SageMaker execution role ARN")
    up.add_argument("--region", help="AWS region (default: $AWS_REGION, then $AWS_DEFAULT_REGION)")
    source = up.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-tar", type=Path, help="local model.tar.gz to upload (needs --bucket)")
    source.add_argument("--model-data-url", help="s3:// URL of an uploaded model.tar.gz")
    up.add_argument("--bucket", help="S3 bucket for --model-tar")
    up.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"S3 key prefix (default {DEFAULT_PREFIX})")
    up.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE, help=f"default {DEFAULT_INSTANCE_TYPE}")
    up.add_argument("--instance-count", type=int, default=1, help="initial instance count (default 1)")
    up.add_argument("--feature-group-name", help="serve item features from this Feature Store group")
    up.add_argument("--user-history-group-name",
                    help="read users' fresh history from this Feature Store group (USER_HISTORY_FEATURE_GROUP_NAME)")
    up.add_argument("--feature-source", choices=["embedded", "featurestore", "cached"], help="FEATURE_SOURCE")
    up.add_argument("--workers", type=int, help="SAGEMAKER_MODEL_SERVER_WORKERS (default: one per vCPU)")
    up.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra container environment")
    up.add_argument("--sample-user", help="user id for the test invocation (default: the model's first user)")
    up.add_argument("--autoscale", nargs=2, type=int, metavar=("MIN", "MAX"), help="instance count range")
    up.add_argument("--target-invocations", type=float, default=200.0,
                    help="autoscaling target, invocations per instance per minute (default 200)")
    up.add_argument("--wait-minutes", type=int, default=30, help="how long to wait for InService (default 30)")
    down = sub.add_parser("teardown", help="delete autoscaling, endpoint, endpoint config and models")
    down.add_argument("--endpoint-name", required=True)
    down.add_argument("--region", help="AWS region (default: $AWS_REGION, then $AWS_DEFAULT_REGION)")
    down.add_argument("--no-wait", action="store_true", help="do not wait for the endpoint to be deleted")
    return parser


def spec_from_args(args: argparse.Namespace, region: str, now: datetime | None = None) -> DeploymentSpec:
    """Validate the ``deploy`` arguments into a :class:`DeploymentSpec`."""
    name = deployment_name(args.name, now)
    environment: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeploymentError(f"--env {item!r}: expected KEY=VALUE")
        environment[key] = value
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
    if args.instance_count < 1:
        raise DeploymentError("--instance-count must be at least 1")
    if args.model_tar is not None and not args.bucket:
        raise DeploymentError("--model-tar needs --bucket")
    autoscaling = None
    if args.autoscale:
        low, high = args.autoscale
        if not 1 <= low <= high:
            raise DeploymentError(f"--autoscale {low} {high}: need 1 <= MIN <= MAX")
        if not low <= args.instance_count <= high:
            raise DeploymentError(f"--instance-count {args.instance_count} is outside --autoscale {low} {high}")
        if args.target_invocations <= 0:
            raise DeploymentError("--target-invocations must be positive")
        autoscaling = Autoscaling(low, high, args.target_invocations)
    sample_user = args.sample_user
    if sample_user is None and args.model_tar is not None:
        sample_user = first_user_id(args.model_tar)
    return DeploymentSpec(
        name=name,
        image_uri=args.image_uri,
        role_arn=args.role_arn,
        region=region,
        model_tar=args.model_tar,
        model_data_url=args.model_data_url,
        bucket=args.bucket,
        prefix=args.prefix,
        instance_type=args.instance_type,
        instance_count=args.instance_count,
        environment=environment,
        autoscaling=autoscaling,
        sample_user_id=sample_user or DeploymentSpec.sample_user_id,
        wait_minutes=args.wait_minutes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``deploy`` or ``teardown``; returns the exit status (0 ok, 1 AWS failure, 2 bad arguments).

    ``deploy`` prints the sample answer, then the endpoint name, on stdout; progress goes to stderr.
    """
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    args = _parser().parse_args(argv)
    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        print("error: no region; pass --region or set AWS_REGION", file=sys.stderr)
        return 2
    try:
        spec = spec_from_args(args, region) if args.command == "deploy" else None
    except DeploymentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    clients = AwsClients.create(region)
    try:
        if spec is not None:
            print(deploy(spec, clients))
            print(spec.name)
        else:
            for line in teardown(clients, args.endpoint_name, wait=not args.no_wait):
                _say(f"deleted {line}")
        return 0
    except ClientError as exc:
        error = exc.response.get("Error", {})
        problem = f"{exc.operation_name}: {error.get('Code')}: {error.get('Message')}"
    except (DeploymentError, BotoCoreError, Boto3Error) as exc:  # no credentials, no connection, S3 upload
        problem = str(exc)
    print(f"error: {problem}", file=sys.stderr)
    if spec is not None:
        print(f"remove what was created with: python -m training teardown "
              f"--endpoint-name {spec.name} --region {region}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
