"""Roll new models onto a live SageMaker endpoint with deployment guardrails, and roll back.

    python -m training deploy --update ENDPOINT --region R
        (--model-tar PATH --bucket B | --model-data-url S3_URI | --variant NAME=MODEL_TAR:WEIGHT ...)
        [--image-uri URI] [--role-arn ARN] [--instance-type T] [--instance-count N] [--env KEY=VALUE ...]
        [--traffic canary|linear|all-at-once] [--step-percent 10] [--wait-interval-s 600]
        [--latency-p99-ms 500] [--gate-tolerance 0.005] [--force] [--data-capture S3_URI] [--no-wait]
    python -m training rollback ENDPOINT --region R [--no-wait] [--wait-minutes 30]

An update reads the live endpoint (status, endpoint config, each variant's model), then, before
creating anything, checks the evaluation gate (:mod:`training.evaluation_gate`). It puts two
CloudWatch alarms per variant (5XX errors, p99 model latency), creates the new Models and
EndpointConfig under new names, and starts ``UpdateEndpoint`` as a blue/green deployment: the new
fleet takes traffic canary-first (default), linearly or all at once, and SageMaker rolls back by
itself if an alarm fires meanwhile. If UpdateEndpoint does not start, the new Models and
EndpointConfig are deleted and the live config stays. Unless --no-wait, it waits for the endpoint
to settle and reports whether the new config is live, then invokes each variant once.

SageMaker's blue/green deployments keep the variant names: a single model (--model-tar or
--model-data-url) replaces the model of a single-variant endpoint; --variant must name every live
variant. Image, role, environment, instance type, current instance count and data capture carry
over from the live variant unless given.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, Final

from training.deployment import (
    DEFAULT_PREFIX,
    MAX_NAME,
    REGION_HELP,
    AwsClients,
    Command,
    DataCapture,
    DeploymentError,
    ModelPlan,
    VariantSpec,
    absent_ok,
    create_models_and_config,
    deployment_name,
    invoke_each_variant,
    model_data_url,
    model_key,
    model_names,
    one_line,
    remove_models_and_config,
    say,
    wait_for_endpoint,
)
from training.evaluation_gate import DEFAULT_TOLERANCE, GateCase
from training.evaluation_gate import check as check_gate

# Tagged on each endpoint config an update creates: the config it replaced. A rollback reads the
# tag of the config the endpoint serves, so the record lives and dies with the config it
# describes, is written in the same call that creates it (no window where an update happened but
# was not recorded), and survives an update SageMaker rolled back by itself: the endpoint then still
# serves the old config, whose own tag is still right. DescribeEndpoint's LastDeploymentConfig
# holds the deployment policy, not the previous config's name, so it cannot serve alone.
PREVIOUS_CONFIG_TAG: Final = "twostage:previous-endpoint-config"
TRAFFIC_TYPES: Final = {"canary": "CANARY", "linear": "LINEAR", "all-at-once": "ALL_AT_ONCE"}
DEFAULT_STEP_PERCENT: Final = 10
DEFAULT_WAIT_INTERVAL_S: Final = 600
# ModelLatency's p99 above which the deployment rolls back (the metric is in microseconds).
# docs/benchmarks.md, the history-aware ML-1M model in-process: one user p50 ~2-5 ms,
# p99 ~10 ms; a 100-user batch ~80-240 ms in all; a cold page cache at 10M users tripled the p99
# of single users. 500 ms for three consecutive minutes is beyond all of that: not a latency
# objective but the line where something broke. A 1M-item catalog answers a 100-user batch in
# ~1 s (~10 ms per user): raise the line for such a model when clients send batches.
DEFAULT_LATENCY_P99_MS: Final = 500.0
MAX_ALARMS: Final = 10  # AutoRollbackConfiguration holds at most 10 alarms: two per variant
# Time for SageMaker to provision the new fleet and for the container to start, added to the
# traffic shifting's own waits to make the deployment's MaximumExecutionTimeoutInSeconds.
PROVISIONING_S: Final = 1800
MAX_EXECUTION_S: Final = 28800  # SageMaker's limit on a blue/green deployment
ROLLBACK_DEPLOYMENT: Final = {
    "BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}}
}
_STAMP_SUFFIX: Final = re.compile(r"-\d{8}-\d{6}$")
_STAMP_LENGTH: Final = len("-20260101-120000")


@dataclass(frozen=True)
class TrafficPolicy:
    """How the blue/green deployment shifts traffic to the new fleet."""

    kind: str = "canary"  # a key of TRAFFIC_TYPES
    step_percent: int = DEFAULT_STEP_PERCENT  # the canary's size, or each linear step's
    wait_interval_s: int = DEFAULT_WAIT_INTERVAL_S  # the baking period after each shift

    @property
    def shifts(self) -> int:
        """Traffic shifts, each followed by a baking period of ``wait_interval_s``."""
        if self.kind == "canary":
            return 2
        if self.kind == "linear":
            return math.ceil(100 / self.step_percent)
        return 1

    @property
    def baking_s(self) -> int:
        return self.shifts * self.wait_interval_s

    def __str__(self) -> str:
        steps = "" if self.kind == "all-at-once" else f" in {self.step_percent}% steps"
        return f"{self.kind}{steps}, {self.wait_interval_s} s baking after each shift"

    def routing(self) -> dict[str, Any]:
        config: dict[str, Any] = {"Type": TRAFFIC_TYPES[self.kind], "WaitIntervalInSeconds": self.wait_interval_s}
        size = {"Type": "CAPACITY_PERCENT", "Value": self.step_percent}
        if self.kind == "canary":
            config["CanarySize"] = size
        elif self.kind == "linear":
            config["LinearStepSize"] = size
        return config

    def deployment_config(self, alarms: Sequence[str]) -> dict[str, Any]:
        """UpdateEndpoint's DeploymentConfig: blue/green with these alarms for automatic rollback."""
        return {
            "BlueGreenUpdatePolicy": {
                "TrafficRoutingConfiguration": self.routing(),
                "MaximumExecutionTimeoutInSeconds": min(MAX_EXECUTION_S, max(600, self.baking_s + PROVISIONING_S)),
            },
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": name} for name in alarms]},
        }


@dataclass(frozen=True)
class UpdateSpec:
    """Everything ``deploy --update`` needs; unset fields carry over from the live endpoint."""

    endpoint: str
    region: str
    variants: tuple[VariantSpec, ...]
    replaces_only_variant: bool = False  # one model for the live endpoint's only variant, whatever its name
    image_uri: str | None = None
    role_arn: str | None = None
    bucket: str | None = None
    prefix: str = DEFAULT_PREFIX
    instance_type: str | None = None
    instance_count: int | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    data_capture: DataCapture | None = None
    traffic: TrafficPolicy = TrafficPolicy()
    latency_p99_ms: float = DEFAULT_LATENCY_P99_MS
    gate_tolerance: float = DEFAULT_TOLERANCE
    force: bool = False
    wait: bool = True
    wait_minutes: float = 30  # on top of the traffic shifting's baking periods
    sample_user_id: str = "sample-user"


@dataclass(frozen=True)
class LiveEndpoint:
    """An InService endpoint: its config, variants and data capture as DescribeEndpointConfig gives it."""

    name: str
    config_name: str
    variants: tuple[ModelPlan, ...]  # each variant's model and container as they are now
    data_capture: Mapping[str, Any] | None


def describe_live(sagemaker: Any, endpoint: str) -> LiveEndpoint:
    """The endpoint as it serves now; one line if it does not exist or is not InService."""
    described = absent_ok(partial(sagemaker.describe_endpoint, EndpointName=endpoint))
    if described is None:
        raise DeploymentError(f"endpoint {endpoint} does not exist; nothing created")
    if described["EndpointStatus"] != "InService":
        raise DeploymentError(f"endpoint {endpoint} is {described['EndpointStatus']}; it must be InService to "
                              "change it; nothing created")
    config = sagemaker.describe_endpoint_config(EndpointConfigName=described["EndpointConfigName"])
    current = {v["VariantName"]: v for v in described.get("ProductionVariants", [])}
    variants = []
    for variant in config["ProductionVariants"]:
        model = sagemaker.describe_model(ModelName=variant["ModelName"])
        container = model.get("PrimaryContainer") or {}
        if "InstanceType" not in variant or "ModelDataUrl" not in container:
            raise DeploymentError(f"variant {variant['VariantName']} of {endpoint} is not an instance-backed variant "
                                  "with one container (as deploy creates); nothing created")
        variants.append(ModelPlan(
            variant=variant["VariantName"],
            model_name=variant["ModelName"],
            image_uri=container["Image"],
            model_data_url=container["ModelDataUrl"],
            role_arn=model["ExecutionRoleArn"],
            environment=container.get("Environment") or {},
            instance_type=variant["InstanceType"],
            instance_count=int(current.get(variant["VariantName"], {}).get("CurrentInstanceCount")
                               or variant["InitialInstanceCount"]),
            weight=float(variant.get("InitialVariantWeight", 1.0)),
        ))
    return LiveEndpoint(endpoint, described["EndpointConfigName"], tuple(variants),
                        config.get("DataCaptureConfig") or None)


def matched_variants(spec: UpdateSpec, live: LiveEndpoint) -> tuple[VariantSpec, ...]:
    """The new variants, named as the live ones; one line when they cannot replace them."""
    live_names = [v.variant for v in live.variants]
    if spec.replaces_only_variant:
        if len(live_names) != 1:
            raise DeploymentError(f"endpoint {live.name} serves variants {', '.join(live_names)}: give "
                                  "--variant NAME=MODEL_TAR:WEIGHT for each of them; nothing created")
        return (replace(spec.variants[0], name=live_names[0]),)
    new_names = [v.name for v in spec.variants]
    if len(new_names) * 2 > MAX_ALARMS:
        raise DeploymentError(f"--update watches at most {MAX_ALARMS // 2} variants (two alarms each, "
                              f"{MAX_ALARMS} per deployment); nothing created")
    if sorted(new_names) != sorted(live_names):
        raise DeploymentError(f"--variant names {', '.join(sorted(new_names))} differ from the live endpoint's "
                              f"{', '.join(sorted(live_names))}: a blue/green update keeps the variant names "
                              "(deploy a new endpoint to change them); nothing created")
    return spec.variants


def update_name(endpoint: str, variants: Sequence[str], now: datetime | None = None) -> str:
    """``<endpoint without its timestamp>-<UTC timestamp>``, short enough for every model name."""
    suffix = max(len(v) + 1 for v in variants) if len(variants) > 1 else 0
    room = MAX_NAME - _STAMP_LENGTH - suffix
    base = _STAMP_SUFFIX.sub("", endpoint)[: max(room, 0)].rstrip("-")
    if not base:
        raise DeploymentError("variant names too long to name the new models; nothing created")
    return deployment_name(base, now)


def alarm_names(endpoint: str, variant: str) -> tuple[str, str]:
    """The guardrail alarms of one variant: 5XX errors, p99 model latency (derived, so puts are idempotent)."""
    return f"{endpoint}-{variant}-invocation-5xx", f"{endpoint}-{variant}-model-latency-p99"


def put_guardrail_alarms(cloudwatch: Any, endpoint: str, variants: Sequence[str], latency_p99_ms: float) -> list[str]:
    """Create or overwrite two alarms per variant; returns their names."""
    names = []
    for variant in variants:
        errors, latency = alarm_names(endpoint, variant)
        common: dict[str, Any] = {
            "Namespace": "AWS/SageMaker",
            "Dimensions": [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": variant}],
            "Period": 60,
            "ComparisonOperator": "GreaterThanThreshold",
            "TreatMissingData": "notBreaching",  # no traffic is no evidence of a broken model
        }
        cloudwatch.put_metric_alarm(
            AlarmName=errors, MetricName="Invocation5XXErrors", Statistic="Sum", Threshold=0.0,
            EvaluationPeriods=1, DatapointsToAlarm=1,
            AlarmDescription=f"{endpoint}/{variant} answered a 5XX in the last minute (rolls back deploy --update)",
            **common,
        )
        cloudwatch.put_metric_alarm(
            AlarmName=latency, MetricName="ModelLatency", ExtendedStatistic="p99",
            Threshold=latency_p99_ms * 1000.0,  # ModelLatency is in microseconds
            EvaluationPeriods=3, DatapointsToAlarm=3,
            AlarmDescription=f"{endpoint}/{variant} p99 model latency above {latency_p99_ms:g} ms for 3 minutes "
                             "(rolls back deploy --update)",
            **common,
        )
        names += [errors, latency]
    return names


def update_endpoint(spec: UpdateSpec, clients: AwsClients, now: datetime | None = None) -> list[str]:
    """Gate, alarms, new Models and EndpointConfig, UpdateEndpoint, wait; returns the sample answers.

    Raises :class:`~training.evaluation_gate.GateRefusal` or :class:`DeploymentError` (one line)
    with nothing created when the endpoint is missing, the variants do not match or the gate
    refuses; when UpdateEndpoint does not start, after deleting what it created.
    """
    sagemaker = clients.sagemaker
    live = describe_live(sagemaker, spec.endpoint)
    variants = matched_variants(spec, live)
    by_name = {v.variant: v for v in live.variants}
    counts = {v.name: spec.instance_count or by_name[v.name].instance_count for v in variants}
    too_small = sorted(name for name, count in counts.items() if count < 2)
    if spec.traffic.kind != "all-at-once" and too_small:
        # CanarySize must be at most 50% of the variant's instances, LinearStepSize 10-50%, and a
        # step is whole instances: one instance cannot be split.
        raise DeploymentError(f"--traffic {spec.traffic.kind} needs at least 2 instances per variant; "
                              f"{', '.join(too_small)} would have 1: use --instance-count 2 or --traffic all-at-once; "
                              "nothing created")
    check_gate(clients.s3, [GateCase(v.name, v.model_tar or v.model_data_url or "", by_name[v.name].model_data_url)
                            for v in variants], spec.gate_tolerance, spec.force)

    resource = update_name(spec.endpoint, [v.name for v in variants], now)
    alarms = put_guardrail_alarms(clients.cloudwatch, spec.endpoint, [v.name for v in variants], spec.latency_p99_ms)
    say(f"alarms for automatic rollback: {', '.join(alarms)}")
    plans = []
    for variant, model_name in zip(variants, model_names(resource, [v.name for v in variants]), strict=True):
        old = by_name[variant.name]
        key = model_key(spec.prefix, resource, variant.name if len(variants) > 1 else None)
        # The live variant's container, with what the command changes.
        plans.append(replace(
            old,
            model_name=model_name,
            image_uri=spec.image_uri or old.image_uri,
            model_data_url=model_data_url(clients.s3, variant, spec.bucket, key),
            role_arn=spec.role_arn or old.role_arn,
            environment={**old.environment, **spec.environment},
            instance_type=spec.instance_type or old.instance_type,
            instance_count=counts[variant.name],
            weight=1.0 if spec.replaces_only_variant else variant.weight,
        ))
    capture = spec.data_capture.to_api() if spec.data_capture else live.data_capture
    create_models_and_config(sagemaker, resource, plans, capture, {PREVIOUS_CONFIG_TAG: live.config_name})
    start_update(sagemaker, spec.endpoint, resource, spec.traffic.deployment_config(alarms),
                 [p.model_name for p in plans], live.config_name)
    say(f"updating {spec.endpoint}: {live.config_name} -> {resource} ({spec.traffic})")
    if not spec.wait:
        say(f"not waiting; roll back with: python -m training rollback {spec.endpoint} --region {spec.region}")
        return []
    finished = wait_for_endpoint(sagemaker, spec.endpoint, spec.wait_minutes + spec.traffic.baking_s / 60)
    if finished["EndpointStatus"] == "InService" and finished["EndpointConfigName"] == resource:
        return invoke_each_variant(clients.runtime, spec.endpoint, [v.name for v in variants], spec.sample_user_id)
    reason = one_line(finished.get("FailureReason") or "no failure reason given")
    if finished["EndpointStatus"] == "InService":
        raise DeploymentError(f"the update rolled back: {spec.endpoint} still serves {finished['EndpointConfigName']} "
                              f"({reason}); {resource} and its models are left for inspection")
    raise DeploymentError(f"endpoint {spec.endpoint} is {finished['EndpointStatus']} after the update: {reason}")


def start_update(
    sagemaker: Any, endpoint: str, config: str, deployment: Mapping[str, Any], models: Sequence[str], live_config: str
) -> None:
    """UpdateEndpoint; if it does not start, delete the new config and models and say the live one stays."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName=config, DeploymentConfig=dict(deployment))
    except (ClientError, BotoCoreError) as exc:
        removed = remove_models_and_config(sagemaker, config, models)
        cause = exc.response.get("Error", {}).get("Message") if isinstance(exc, ClientError) else str(exc)
        raise DeploymentError(f"UpdateEndpoint did not start ({one_line(str(cause))}); removed "
                              f"{', '.join(removed) or 'nothing'}; {endpoint} still serves {live_config}") from None


def previous_config(sagemaker: Any, config_name: str) -> str | None:
    """The config that ``config_name`` replaced, from its tag; None if it records none."""
    arn = sagemaker.describe_endpoint_config(EndpointConfigName=config_name)["EndpointConfigArn"]
    for page in sagemaker.get_paginator("list_tags").paginate(ResourceArn=arn):
        for tag in page.get("Tags", []):
            if tag["Key"] == PREVIOUS_CONFIG_TAG:
                return str(tag["Value"])
    return None


def rollback(clients: AwsClients, endpoint: str, wait: bool = True, wait_minutes: float = 30) -> str:
    """Return the endpoint to the config its live one replaced; returns that config's name.

    A blue/green deployment with all traffic at once and no alarms: the alarms may still be in
    ALARM from the model being rolled back, and would undo the rollback. Rolling back again goes
    one more step back (the restored config's own tag), as far as the updates recorded.
    """
    sagemaker = clients.sagemaker
    described = absent_ok(partial(sagemaker.describe_endpoint, EndpointName=endpoint))
    if described is None:
        raise DeploymentError(f"endpoint {endpoint} does not exist")
    if described["EndpointStatus"] != "InService":
        raise DeploymentError(f"endpoint {endpoint} is {described['EndpointStatus']}; roll back when it is InService")
    current = described["EndpointConfigName"]
    previous = previous_config(sagemaker, current)
    if previous is None:
        raise DeploymentError(f"endpoint {endpoint} serves {current}, which records no previous endpoint config "
                              "(only deploy --update records one); nothing to roll back to")
    if absent_ok(partial(sagemaker.describe_endpoint_config, EndpointConfigName=previous)) is None:
        raise DeploymentError(f"the previous endpoint config {previous} of {endpoint} no longer exists")
    say(f"rolling {endpoint} back: {current} -> {previous} (blue/green, all at once)")
    sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName=previous, DeploymentConfig=ROLLBACK_DEPLOYMENT)
    if wait:
        finished = wait_for_endpoint(sagemaker, endpoint, wait_minutes)
        if finished["EndpointStatus"] != "InService" or finished["EndpointConfigName"] != previous:
            reason = one_line(finished.get("FailureReason") or "no failure reason given")
            raise DeploymentError(f"the rollback did not complete: {endpoint} is {finished['EndpointStatus']} "
                                  f"serving {finished['EndpointConfigName']} ({reason})")
    return previous


def add_update_arguments(parser: argparse.ArgumentParser) -> None:
    """``deploy``'s options for ``--update``."""
    group = parser.add_argument_group("updating a live endpoint (--update)")
    group.add_argument("--update", metavar="ENDPOINT",
                       help="roll the model(s) onto this live endpoint (blue/green, alarms, evaluation gate)")
    group.add_argument("--traffic", choices=list(TRAFFIC_TYPES), default="canary",
                       help="how the new fleet takes traffic: canary (default: --step-percent first, the rest after "
                            "one baking period), linear (--step-percent per step) or all-at-once; canary and linear "
                            "need at least 2 instances per variant")
    group.add_argument("--step-percent", type=int, default=DEFAULT_STEP_PERCENT,
                       help=f"canary size (1..50) or linear step (10..50), percent of the fleet "
                            f"(default {DEFAULT_STEP_PERCENT})")
    group.add_argument("--wait-interval-s", type=int, default=DEFAULT_WAIT_INTERVAL_S,
                       help=f"baking period after each traffic shift, 0..3600 s (default {DEFAULT_WAIT_INTERVAL_S})")
    group.add_argument("--latency-p99-ms", type=float, default=DEFAULT_LATENCY_P99_MS,
                       help=f"roll back when the p99 ModelLatency stays above this for 3 minutes (default "
                            f"{DEFAULT_LATENCY_P99_MS:g} ms: ML-1M serves a user in ~2-5 ms and a 100-user batch in "
                            "~80-240 ms, so this marks a broken model, not a slow one; a 1M-item catalog takes ~1 s "
                            "per 100-user batch: raise it there)")
    group.add_argument("--gate-tolerance", type=float, default=DEFAULT_TOLERANCE,
                       help=f"refuse a new model whose NDCG@10 (manifest extra.evaluation) is below the live one's "
                            f"by more than this (default {DEFAULT_TOLERANCE:g})")
    group.add_argument("--force", action="store_true",
                       help="update even when the evaluation gate refuses (worse NDCG@10, no number, other dataset)")
    group.add_argument("--no-wait", action="store_true",
                       help="start the update and return (default: wait, report, invoke each variant once)")


def add_rollback_parser(sub: Any) -> None:
    back = sub.add_parser(
        "rollback", help="return an endpoint to the endpoint config its last deploy --update replaced",
        description="Return ENDPOINT to the endpoint config that its live config replaced (recorded by deploy "
                    f"--update in the tag {PREVIOUS_CONFIG_TAG} of each config it creates), blue/green with all "
                    "traffic at once. Rolling back again goes one more update back. After an update that SageMaker "
                    "already rolled back by itself, the endpoint serves the old config, so this goes one step "
                    "further back.",
    )
    back.add_argument("endpoint", metavar="ENDPOINT")
    back.add_argument("--region", help=REGION_HELP)
    back.add_argument("--no-wait", action="store_true", help="start the rollback and return")
    back.add_argument("--wait-minutes", type=float, default=30, help="how long to wait for InService (default 30)")


def rollback_command(args: argparse.Namespace) -> Command:
    def run(clients: AwsClients) -> int:
        restored = rollback(clients, args.endpoint, wait=not args.no_wait, wait_minutes=args.wait_minutes)
        say(f"{args.endpoint} {'serves' if not args.no_wait else 'is rolling back to'} {restored}")
        print(restored)
        return 0

    return Command(run)

