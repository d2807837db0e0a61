"""Deploy the serving image and models to a SageMaker real-time endpoint; invoke it; tear it down.

The AWS side of ``python -m training deploy | invoke | teardown`` (the command line is
:mod:`training.deployment_cli`; ``deploy --update`` and ``rollback`` are
:mod:`training.endpoint_update`, ``transform`` :mod:`training.transform`).

``deploy`` uploads each model.tar.gz to S3, creates one Model per production variant, the
EndpointConfig and the Endpoint (all named ``<name>-<UTC timestamp>``; with several variants the
models are ``<name>-<timestamp>-<variant>``), waits until the endpoint is InService, optionally
registers target-tracking autoscaling on invocations per instance, and invokes every variant
once. ``teardown`` removes the autoscaling targets, the guardrail alarms of ``deploy --update``,
the endpoint, its endpoint config and its models; the model data stays in S3. boto3 only; the
region is always passed explicitly.
"""

from __future__ import annotations

import json
import re
import sys
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Final

VARIANT: Final = "AllTraffic"
SCALABLE_DIMENSION: Final = "sagemaker:variant:DesiredInstanceCount"
DEFAULT_INSTANCE_TYPE: Final = "ml.c7i.large"
DEFAULT_PREFIX: Final = "twostage-rec/models"
# Captured requests are for monitoring and spot checks, which a sample serves; 100 keeps every
# request and answer, for a full replay, at ten times the S3 objects and storage.
DEFAULT_CAPTURE_PERCENT: Final = 10
# The content types the endpoint (and a batch transform) receives and answers; SageMaker writes
# captured payloads of these types as readable JSON instead of base64.
CAPTURE_JSON_CONTENT_TYPES: Final = ("application/json", "application/jsonlines", "application/x-jsonlines")
MAX_VARIANTS: Final = 10  # production variants per endpoint config
# twostage_rec.artifact.USER_ID_FILES[:2]: the ids' bytes and offsets, read straight from the archive.
USER_ID_DATA_FILE: Final = "user_id_data.npy"
USER_ID_OFFSETS_FILE: Final = "user_id_offsets.npy"
NAME_RE: Final = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")  # SageMaker's resource name pattern
MAX_NAME: Final = 63
REGION_HELP: Final = "AWS region (default: $AWS_REGION, then $AWS_DEFAULT_REGION)"
_BUCKET_RE: Final = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_STAMP_FORMAT: Final = "%Y%m%d-%H%M%S"
_SETTLED: Final = frozenset({"InService", "Failed", "UpdateRollbackFailed", "OutOfService"})


class DeploymentError(Exception):
    """A deployment step failed; the message is one line for the operator."""


@dataclass(frozen=True)
class Autoscaling:
    """Target tracking on each variant's instance count."""

    min_capacity: int
    max_capacity: int
    target_invocations: float  # SageMakerVariantInvocationsPerInstance, per minute
    scale_in_cooldown_s: int = 300
    scale_out_cooldown_s: int = 60


@dataclass(frozen=True)
class DataCapture:
    """The endpoint config's DataCaptureConfig: requests and answers sampled to S3 as JSON lines."""

    destination_s3_uri: str
    sampling_percent: int = DEFAULT_CAPTURE_PERCENT

    def to_api(self) -> dict[str, Any]:
        return {
            "EnableCapture": True,
            "InitialSamplingPercentage": self.sampling_percent,
            "DestinationS3Uri": self.destination_s3_uri,
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            "CaptureContentTypeHeader": {"JsonContentTypes": list(CAPTURE_JSON_CONTENT_TYPES)},
        }


@dataclass(frozen=True)
class VariantSpec:
    """One production variant: its model archive (a local model.tar.gz or an s3:// URL) and weight."""

    name: str
    model_tar: Path | None = None
    model_data_url: str | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class DeploymentSpec:
    """Everything ``deploy`` needs for a new endpoint; local archives are uploaded to ``bucket``.

    ``name`` is the full resource name (see :func:`deployment_name`) shared by the endpoint config
    and the endpoint, and by the model when there is one variant.
    """

    name: str
    image_uri: str
    role_arn: str
    region: str
    variants: tuple[VariantSpec, ...]
    bucket: str | None = None
    prefix: str = DEFAULT_PREFIX
    instance_type: str = DEFAULT_INSTANCE_TYPE
    instance_count: int = 1
    environment: Mapping[str, str] = field(default_factory=dict)
    autoscaling: Autoscaling | None = None
    data_capture: DataCapture | None = None
    sample_user_id: str = "sample-user"  # an unknown user still gets the popularity fallback
    wait_minutes: int = 30


@dataclass(frozen=True)
class ModelPlan:
    """One Model and the production variant that serves it: to create, or as an endpoint serves it now."""

    variant: str
    model_name: str
    image_uri: str
    model_data_url: str
    role_arn: str
    environment: Mapping[str, str]
    instance_type: str
    instance_count: int
    weight: float = 1.0

    def production_variant(self) -> dict[str, Any]:
        return {
            "VariantName": self.variant,
            "ModelName": self.model_name,
            "InstanceType": self.instance_type,
            "InitialInstanceCount": self.instance_count,
            "InitialVariantWeight": float(self.weight),
        }


@dataclass(frozen=True)
class AwsClients:
    """The boto3 clients the deployment commands use, all in one explicit region."""

    s3: Any
    sagemaker: Any
    runtime: Any
    autoscaling: Any
    cloudwatch: Any

    @classmethod
    def create(cls, region: str) -> AwsClients:
        import boto3

        session = boto3.session.Session(region_name=region)
        return cls(
            s3=session.client("s3", region_name=region),
            sagemaker=session.client("sagemaker", region_name=region),
            runtime=session.client("sagemaker-runtime", region_name=region),
            autoscaling=session.client("application-autoscaling", region_name=region),
            cloudwatch=session.client("cloudwatch", region_name=region),
        )


@dataclass(frozen=True)
class Command:
    """A validated command, ready to run against AWS; ``on_failure`` is a hint printed after a failure."""

    run: Callable[[AwsClients], int]
    on_failure: str | None = None


def deployment_name(name: str, now: datetime | None = None) -> str:
    """``<name>-<UTC YYYYmmdd-HHMMSS>``, valid as a SageMaker model, config and endpoint name."""
    stamp = (now or datetime.now(timezone.utc)).strftime(_STAMP_FORMAT)
    full = f"{name}-{stamp}"
    if not NAME_RE.match(name) or len(full) > MAX_NAME:
        raise DeploymentError(
            f"--name {name!r}: use letters, digits and hyphens, at most {MAX_NAME - len(stamp) - 1} characters"
        )
    return full


def model_names(resource: str, variants: Sequence[str]) -> list[str]:
    """The model of each variant: the resource's own name for one variant, ``<resource>-<variant>`` for several."""
    if len(variants) == 1:
        return [resource]
    names = [f"{resource}-{variant}" for variant in variants]
    for name in names:
        if len(name) > MAX_NAME:
            raise DeploymentError(f"model name {name!r} is longer than {MAX_NAME} characters; "
                                  "use a shorter name or shorter variant names")
    return names


def s3_location(uri: str, flag: str) -> tuple[str, str]:
    """``(bucket, key)`` of an ``s3://bucket[/key]`` URI; a one-line error naming ``flag`` otherwise."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not _BUCKET_RE.match(bucket):
        raise DeploymentError(f"{flag} {uri!r}: expected an s3://bucket/prefix URI")
    return bucket, key


def deploy(spec: DeploymentSpec, clients: AwsClients) -> list[str]:
    """Upload, create models, endpoint config and endpoint; wait; autoscale; invoke each variant once.

    Returns the sample answers' bodies, one per variant.
    """
    name = spec.name
    variant_names = [v.name for v in spec.variants]
    plans = []
    for variant, model_name in zip(spec.variants, model_names(name, variant_names), strict=True):
        key = model_key(spec.prefix, name, variant.name if len(spec.variants) > 1 else None)
        plans.append(ModelPlan(
            variant=variant.name,
            model_name=model_name,
            image_uri=spec.image_uri,
            model_data_url=model_data_url(clients.s3, variant, spec.bucket, key),
            role_arn=spec.role_arn,
            environment={"AWS_REGION": spec.region, **spec.environment},
            instance_type=spec.instance_type,
            instance_count=spec.instance_count,
            weight=variant.weight,
        ))
    capture = spec.data_capture.to_api() if spec.data_capture else None
    create_models_and_config(clients.sagemaker, name, plans, capture)
    say(f"creating endpoint {name} ({len(plans)} variant(s), {spec.instance_count} x {spec.instance_type} each); "
         "waiting for InService")
    clients.sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    wait_in_service(clients.sagemaker, name, spec.wait_minutes)
    if spec.autoscaling:
        for variant in variant_names:
            register_autoscaling(clients.autoscaling, name, spec.autoscaling, variant)
    return invoke_each_variant(clients.runtime, name, variant_names, spec.sample_user_id)


def invoke_each_variant(runtime: Any, endpoint: str, variants: Sequence[str], user_id: str) -> list[str]:
    """One sample request to each variant (TargetVariant; none for a lone variant); returns the bodies."""
    say(f"endpoint {endpoint} is InService; invoking it for user {user_id!r}")
    if len(variants) == 1:
        return [invoke(runtime, endpoint, user_id)]
    return [invoke(runtime, endpoint, user_id, target_variant=variant) for variant in variants]


def model_key(prefix: str, resource: str, variant: str | None = None) -> str:
    """``prefix/<resource>[/<variant>]/model.tar.gz``: where a local archive is uploaded."""
    return "/".join(part for part in (prefix.strip("/"), resource, variant, "model.tar.gz") if part)


def model_data_url(s3: Any, variant: VariantSpec, bucket: str | None, key: str) -> str:
    """The variant's s3:// URL, uploading its local archive to ``s3://bucket/key`` first."""
    if variant.model_data_url is not None:
        return variant.model_data_url
    if variant.model_tar is None or bucket is None:
        raise DeploymentError("give --model-data-url, or --model-tar with --bucket")
    if not variant.model_tar.is_file():
        raise DeploymentError(f"{variant.model_tar}: model archive not found")
    say(f"uploading {variant.model_tar} to s3://{bucket}/{key}")
    s3.upload_file(str(variant.model_tar), bucket, key)
    return f"s3://{bucket}/{key}"


def create_model(
    sagemaker: Any, name: str, image_uri: str, data_url: str, role_arn: str, environment: Mapping[str, str]
) -> None:
    """One SageMaker Model: the serving image with a model.tar.gz from S3."""
    say(f"creating model {name} ({image_uri}, {data_url})")
    sagemaker.create_model(
        ModelName=name,
        ExecutionRoleArn=role_arn,
        PrimaryContainer={"Image": image_uri, "ModelDataUrl": data_url, "Environment": dict(environment)},
    )


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``--env KEY=VALUE`` items as a mapping; a one-line error for an item without ``=``."""
    environment: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeploymentError(f"--env {item!r}: expected KEY=VALUE")
        environment[key] = value
    return environment


def create_models_and_config(
    sagemaker: Any,
    config_name: str,
    plans: Sequence[ModelPlan],
    data_capture: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Create every plan's Model, then the endpoint config serving them; all or nothing.

    When a step fails, what this call created is deleted again before the error propagates.
    """
    created: list[str] = []
    config: dict[str, Any] = {
        "EndpointConfigName": config_name,
        "ProductionVariants": [plan.production_variant() for plan in plans],
    }
    if data_capture is not None:  # DataCaptureConfig as the API takes it
        config["DataCaptureConfig"] = dict(data_capture)
    if tags:
        config["Tags"] = [{"Key": key, "Value": value} for key, value in tags.items()]
    try:
        for plan in plans:
            create_model(sagemaker, plan.model_name, plan.image_uri, plan.model_data_url, plan.role_arn,
                         plan.environment)
            created.append(plan.model_name)
        sagemaker.create_endpoint_config(**config)
    except Exception:
        remove_models_and_config(sagemaker, None, created)
        raise


def remove_models_and_config(sagemaker: Any, config_name: str | None, models: Sequence[str]) -> list[str]:
    """Best-effort delete of an endpoint config and models no endpoint uses; returns what was deleted."""
    from botocore.exceptions import BotoCoreError, ClientError

    calls: list[tuple[str, Callable[[], Any]]] = [
        (f"model {model}", partial(sagemaker.delete_model, ModelName=model)) for model in models
    ]
    if config_name is not None:  # the config before the models it names
        calls.insert(0, (f"endpoint config {config_name}",
                         partial(sagemaker.delete_endpoint_config, EndpointConfigName=config_name)))
    deleted = []
    for what, call in calls:
        try:
            call()
            deleted.append(what)
        except (ClientError, BotoCoreError) as exc:  # the original failure matters more than this one
            say(f"could not delete {what}: {exc}")
    return deleted


def wait_for_endpoint(sagemaker: Any, endpoint: str, minutes: float, poll_s: float = 30.0) -> dict[str, Any]:
    """Poll DescribeEndpoint until the endpoint settles; return its last description.

    Settled: InService, Failed, UpdateRollbackFailed or OutOfService. boto3's
    ``endpoint_in_service`` waiter knows only InService and Failed, so a blue/green update whose
    rollback failed would keep it polling until it times out.
    """
    deadline = time.monotonic() + minutes * 60
    while True:
        described = sagemaker.describe_endpoint(EndpointName=endpoint)
        status = described["EndpointStatus"]
        if status in _SETTLED:
            return dict(described)
        if time.monotonic() >= deadline:
            raise DeploymentError(f"endpoint {endpoint} is still {status} after {minutes:g} minutes")
        time.sleep(poll_s)


def wait_in_service(sagemaker: Any, endpoint: str, minutes: float) -> dict[str, Any]:
    """Wait until the endpoint settles; raise with its FailureReason unless it is InService."""
    described = wait_for_endpoint(sagemaker, endpoint, minutes)
    if described["EndpointStatus"] != "InService":
        reason = described.get("FailureReason") or "no failure reason given"
        raise DeploymentError(
            f"endpoint {endpoint} is {described['EndpointStatus']}, not InService: {one_line(reason)}"
        )
    return described


def register_autoscaling(autoscaling: Any, endpoint: str, policy: Autoscaling, variant: str = VARIANT) -> None:
    """Target tracking on ``SageMakerVariantInvocationsPerInstance`` for one variant of the endpoint."""
    resource_id = scalable_resource_id(endpoint, variant)
    say(f"autoscaling {resource_id}: {policy.min_capacity}..{policy.max_capacity} instances, "
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


def scalable_resource_id(endpoint: str, variant: str = VARIANT) -> str:
    """Application Auto Scaling's id for one variant of the endpoint."""
    return f"endpoint/{endpoint}/variant/{variant}"


def invoke(
    runtime: Any,
    endpoint: str,
    user_id: str,
    top_k: int = 5,
    target_variant: str | None = None,
    as_of: int | None = None,
) -> str:
    """One recommendation request through sagemaker-runtime; returns the response body as text.

    ``target_variant`` sends it to that production variant instead of one chosen by weight.
    """
    request: dict[str, Any] = {"user_id": user_id, "top_k": top_k}
    if as_of is not None:
        request["as_of"] = as_of
    call: dict[str, Any] = {"EndpointName": endpoint, "ContentType": "application/json", "Accept": "application/json",
                            "Body": json.dumps(request).encode("utf-8")}
    if target_variant is not None:
        call["TargetVariant"] = target_variant
    response = runtime.invoke_endpoint(**call)
    return response["Body"].read().decode("utf-8", errors="replace")


def endpoint_error(exc: Any) -> str:
    """One line for a failed invoke_endpoint: the container's own message when it answered 4xx/5xx.

    sagemaker-runtime reports the container's error status as a ModelError (HTTP 424) carrying
    the original status and body; the body is the serving error object ``{"error", "message"}``.
    """
    error = exc.response.get("Error", {})
    if error.get("Code") != "ModelError":
        return f"{exc.operation_name}: {error.get('Code')}: {one_line(str(error.get('Message')))}"
    status = exc.response.get("OriginalStatusCode", "?")
    original = str(exc.response.get("OriginalMessage") or error.get("Message") or "")
    try:
        body = json.loads(original)
    except json.JSONDecodeError:
        body = None
    if isinstance(body, dict) and "message" in body:
        return f"endpoint answered {status} {body.get('error', 'error')}: {one_line(str(body['message']))}"
    return f"endpoint answered {status}: {one_line(original)}"


def teardown(clients: AwsClients, endpoint: str, wait: bool = True) -> list[str]:
    """Delete autoscaling, guardrail alarms, the endpoint, its config and its models; missing pieces are skipped.

    Returns what was deleted, e.g. ``["endpoint recs-...", "model recs-..."]``.
    """
    from training.endpoint_update import alarm_names

    deleted: list[str] = []
    described = absent_ok(lambda: clients.sagemaker.describe_endpoint(EndpointName=endpoint))
    variants = [v["VariantName"] for v in (described or {}).get("ProductionVariants", [])] or [VARIANT]
    for variant in variants:
        if _deregister(clients.autoscaling, scalable_resource_id(endpoint, variant)):
            deleted.append(f"autoscaling target {scalable_resource_id(endpoint, variant)}")  # its policies go too
    alarms = [name for variant in variants for name in alarm_names(endpoint, variant)]
    existing = [a["AlarmName"] for a in clients.cloudwatch.describe_alarms(AlarmNames=alarms)["MetricAlarms"]]
    if existing:
        clients.cloudwatch.delete_alarms(AlarmNames=existing)
        deleted += [f"alarm {name}" for name in existing]
    config_name = endpoint
    if described:
        config_name = described["EndpointConfigName"]
        clients.sagemaker.delete_endpoint(EndpointName=endpoint)
        deleted.append(f"endpoint {endpoint}")
        if wait:
            clients.sagemaker.get_waiter("endpoint_deleted").wait(
                EndpointName=endpoint, WaiterConfig={"Delay": 15, "MaxAttempts": 80}
            )
    models = [endpoint]
    config = absent_ok(lambda: clients.sagemaker.describe_endpoint_config(EndpointConfigName=config_name))
    if config:
        models = [v["ModelName"] for v in config["ProductionVariants"]]
        clients.sagemaker.delete_endpoint_config(EndpointConfigName=config_name)
        deleted.append(f"endpoint config {config_name}")
    for model in dict.fromkeys(models):
        if absent_ok(partial(clients.sagemaker.delete_model, ModelName=model)) is not None:
            deleted.append(f"model {model}")
    return deleted


def _deregister(autoscaling: Any, resource_id: str) -> bool:
    """Remove a variant's scalable target (its policies go with it); False if there was none."""
    return absent_ok(partial(autoscaling.deregister_scalable_target, ServiceNamespace="sagemaker",
                             ResourceId=resource_id, ScalableDimension=SCALABLE_DIMENSION)) is not None


def absent_ok(call: Any) -> Any:
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


def one_line(text: str) -> str:
    """``text`` with its whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(text.split())


def say(message: str) -> None:
    """Progress for the operator, on stderr (stdout carries the commands' results)."""
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
