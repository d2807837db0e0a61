"""``deploy --update`` and ``rollback`` against moto, with UpdateEndpoint answered by EndpointUpdates.

Each test deploys a live endpoint (two ml.c5.large instances: canary traffic needs two) from an
archive whose manifest carries an NDCG@10, then updates it.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

import boto3
import pytest

from tests.support.sagemaker_fakes import BUCKET, IMAGE, REGION, ROLE, EndpointUpdates, manifest_tar
from training import deployment, deployment_cli, endpoint_update
from training.endpoint_update import PREVIOUS_CONFIG_TAG, TrafficPolicy

LIVE_NDCG = 0.30


@pytest.fixture(autouse=True)
def ticking_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each resource name gets its own second, as minutes apart in real use (a name's stamp is in seconds)."""
    seconds = iter(range(10**6))

    class Clock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Clock:
            return cls(2026, 1, 1, tzinfo=tz) + timedelta(seconds=next(seconds))  # type: ignore[return-value]

    monkeypatch.setattr(deployment, "datetime", Clock)


def live_endpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """Deploy ``recs`` from an archive with NDCG@10 0.30 on ml-1m; returns the endpoint's name."""
    tar = manifest_tar(tmp_path / "live.tar.gz", LIVE_NDCG)
    assert deployment_cli.main([
        "deploy", "--name", "recs", "--image-uri", IMAGE, "--role-arn", ROLE, "--region", REGION,
        "--bucket", BUCKET, "--instance-type", "ml.c5.large", "--instance-count", "2",
        "--env", "FEATURE_SOURCE=embedded", *(extra or ("--model-tar", str(tar))),
    ]) == 0  # fmt: skip
    return capsys.readouterr().out.strip().splitlines()[-1]


class Live(NamedTuple):
    endpoint: str
    config: str  # the endpoint config it serves
    updates: EndpointUpdates  # what UpdateEndpoint is asked (moto has no UpdateEndpoint)


@pytest.fixture
def live(clients: deployment.AwsClients, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Live:
    """A live endpoint (:func:`live_endpoint`) whose updates the stub accepts."""
    endpoint = live_endpoint(tmp_path, capsys)
    return Live(endpoint, config_of(endpoint), EndpointUpdates(clients.sagemaker))


def update_args(endpoint: str, *extra: str) -> list[str]:
    return ["deploy", "--update", endpoint, "--region", REGION, "--bucket", BUCKET, *extra]


def sagemaker() -> Any:
    return boto3.client("sagemaker", region_name=REGION)


def config_of(endpoint: str) -> str:
    """The endpoint config ``endpoint`` serves now."""
    return str(sagemaker().describe_endpoint(EndpointName=endpoint)["EndpointConfigName"])


def config_tags(config: str) -> dict[str, str]:
    arn = sagemaker().describe_endpoint_config(EndpointConfigName=config)["EndpointConfigArn"]
    return {t["Key"]: t["Value"] for t in sagemaker().list_tags(ResourceArn=arn)["Tags"]}


def test_update_rolls_a_better_model_out_canary_first_with_alarms(live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint, live_config, updates = live
    new_tar = manifest_tar(tmp_path / "new.tar.gz", 0.298)  # within the 0.005 tolerance

    assert deployment_cli.main(update_args(endpoint, "--model-tar", str(new_tar), "--latency-p99-ms", "250")) == 0

    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == endpoint
    assert "evaluation gate: AllTraffic: NDCG@10 new 0.2980, live 0.3000 (tolerance 0.005): passed" in out.err
    [request] = updates.requests
    new_config = request["EndpointConfigName"]
    assert new_config != live_config and new_config.startswith("recs-")
    errors, latency = f"{endpoint}-AllTraffic-invocation-5xx", f"{endpoint}-AllTraffic-model-latency-p99"
    assert request == {
        "EndpointName": endpoint,
        "EndpointConfigName": new_config,
        "DeploymentConfig": {
            "BlueGreenUpdatePolicy": {
                "TrafficRoutingConfiguration": {
                    "Type": "CANARY",
                    "WaitIntervalInSeconds": 600,
                    "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10},
                },
                "MaximumExecutionTimeoutInSeconds": 2 * 600 + 1800,
            },
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": errors}, {"AlarmName": latency}]},
        },
    }
    # The new config: same variant name, the live instance type and count, a new model with the live
    # image, role and environment; tagged with the config it replaces.
    [variant] = sagemaker().describe_endpoint_config(EndpointConfigName=new_config)["ProductionVariants"]
    assert (variant["VariantName"], variant["ModelName"]) == ("AllTraffic", new_config)
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.c5.large", 2)
    model = sagemaker().describe_model(ModelName=new_config)
    container = model["PrimaryContainer"]
    assert container["Image"] == IMAGE and model["ExecutionRoleArn"] == ROLE
    assert container["Environment"] == {"AWS_REGION": REGION, "FEATURE_SOURCE": "embedded"}
    assert container["ModelDataUrl"] == f"s3://{BUCKET}/twostage-rec/models/{new_config}/model.tar.gz"
    assert config_tags(new_config) == {PREVIOUS_CONFIG_TAG: live_config}
    assert config_of(endpoint) == new_config

    cloudwatch = boto3.client("cloudwatch", region_name=REGION)
    alarms = {a["AlarmName"]: a for a in cloudwatch.describe_alarms(AlarmNames=[errors, latency])["MetricAlarms"]}
    dimensions = [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": "AllTraffic"}]
    for alarm in alarms.values():
        assert (alarm["Namespace"], alarm["Dimensions"], alarm["Period"]) == ("AWS/SageMaker", dimensions, 60)
        assert (alarm["ComparisonOperator"], alarm["TreatMissingData"]) == ("GreaterThanThreshold", "notBreaching")
    assert alarms[errors]["MetricName"] == "Invocation5XXErrors"
    assert (alarms[errors]["Statistic"], alarms[errors]["Threshold"], alarms[errors]["EvaluationPeriods"]) == (
        "Sum", 0.0, 1
    )
    assert alarms[latency]["MetricName"] == "ModelLatency"
    assert (alarms[latency]["ExtendedStatistic"], alarms[latency]["Threshold"]) == ("p99", 250_000.0)  # microseconds
    assert (alarms[latency]["EvaluationPeriods"], alarms[latency]["DatapointsToAlarm"]) == (3, 3)

    # Teardown removes the alarms with the endpoint.
    assert deployment_cli.main(["teardown", "--endpoint-name", endpoint, "--region", REGION]) == 0
    assert f"deleted alarm {errors}\n" in capsys.readouterr().err
    assert cloudwatch.describe_alarms(AlarmNames=[errors, latency])["MetricAlarms"] == []


def test_the_gate_refuses_a_worse_model_with_one_line_and_creates_nothing(live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint, _, updates = live
    worse = manifest_tar(tmp_path / "worse.tar.gz", 0.2949)
    before = sagemaker().list_models()["Models"], sagemaker().list_endpoint_configs()["EndpointConfigs"]

    assert deployment_cli.main(update_args(endpoint, "--model-tar", str(worse))) == 3

    assert capsys.readouterr().err == (
        "refused: evaluation gate: AllTraffic: new model NDCG@10 0.2949 < live 0.3000 - tolerance 0.005; "
        "nothing created (--force updates anyway)\n"
    )
    assert (sagemaker().list_models()["Models"], sagemaker().list_endpoint_configs()["EndpointConfigs"]) == before
    assert boto3.client("cloudwatch", region_name=REGION).describe_alarms()["MetricAlarms"] == []
    assert updates.requests == []

    # A wider tolerance lets it through; --force lets through one worse than that (0.28 < 0.2949 live now).
    assert deployment_cli.main(update_args(endpoint, "--model-tar", str(worse), "--gate-tolerance", "0.01")) == 0
    much_worse = manifest_tar(tmp_path / "much-worse.tar.gz", 0.28)
    assert deployment_cli.main(update_args(endpoint, "--model-tar", str(much_worse), "--force")) == 0
    assert ("evaluation gate overridden by --force: AllTraffic: new model NDCG@10 0.2800 < live 0.2949"
            in capsys.readouterr().err)
    assert len(updates.requests) == 2


@pytest.mark.parametrize(
    ("ndcg", "dataset", "message"),
    [
        (None, "ml-1m", "AllTraffic: the new model's manifest has no extra.evaluation['ndcg@10']"),
        (0.5, "ml-100k", "AllTraffic: the new model was trained on 'ml-100k', the live one on 'ml-1m'"),
    ],
)
def test_the_gate_refuses_without_a_number_or_across_datasets(
    clients: deployment.AwsClients, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ndcg: float | None, dataset: str, message: str,
) -> None:  # fmt: skip
    endpoint = live_endpoint(tmp_path, capsys)
    updates = EndpointUpdates(clients.sagemaker)
    new = manifest_tar(tmp_path / "new.tar.gz", ndcg, dataset)
    assert deployment_cli.main(update_args(endpoint, "--model-tar", str(new))) == 3
    assert message in capsys.readouterr().err
    assert updates.requests == []
    assert deployment_cli.main(update_args(endpoint, "--model-tar", str(new), "--force")) == 0
    assert len(updates.requests) == 1


def test_the_gate_reads_the_live_models_manifest_from_s3(
    clients: deployment.AwsClients, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A live model without the number refuses too: the live side is read through DescribeModel and S3."""
    tar = manifest_tar(tmp_path / "old.tar.gz", None)
    endpoint = live_endpoint(tmp_path, capsys, "--model-tar", str(tar))
    EndpointUpdates(clients.sagemaker)
    s3_new = f"s3://{BUCKET}/candidates/model.tar.gz"
    clients.s3.upload_file(str(manifest_tar(tmp_path / "new.tar.gz", 0.4)), BUCKET, "candidates/model.tar.gz")
    assert deployment_cli.main(update_args(endpoint, "--model-data-url", s3_new)) == 3
    assert "the live model's manifest has no extra.evaluation['ndcg@10']" in capsys.readouterr().err


def test_updating_a_missing_endpoint_is_one_line_and_creates_nothing(
    clients: deployment.AwsClients, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new = manifest_tar(tmp_path / "new.tar.gz", 0.4)
    assert deployment_cli.main(update_args("nope", "--model-tar", str(new))) == 1
    assert capsys.readouterr().err == "error: endpoint nope does not exist; nothing created\n"
    assert sagemaker().list_models()["Models"] == []
    assert clients.s3.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0


def test_an_update_that_does_not_start_leaves_the_live_config_and_removes_the_new_one(
    clients: deployment.AwsClients, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = live_endpoint(tmp_path, capsys)
    live_config = config_of(endpoint)
    models_before = sagemaker().list_models()["Models"]
    EndpointUpdates(clients.sagemaker, outcome="refused")

    assert deployment_cli.main(update_args(endpoint, "--model-tar", str(manifest_tar(tmp_path / "n.tar.gz")))) == 1

    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: UpdateEndpoint did not start (Cannot update in-progress endpoint); removed endpoint "
                          "config recs-")
    assert err.endswith(f"; {endpoint} still serves {live_config}")
    assert [c["EndpointConfigName"] for c in sagemaker().list_endpoint_configs()["EndpointConfigs"]] == [live_config]
    assert sagemaker().list_models()["Models"] == models_before
    assert config_of(endpoint) == live_config


def test_an_update_rolled_back_by_an_alarm_exits_1_and_says_so(
    clients: deployment.AwsClients, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = live_endpoint(tmp_path, capsys)
    live_config = config_of(endpoint)
    EndpointUpdates(clients.sagemaker, outcome="rolled-back")
    assert deployment_cli.main(update_args(endpoint, "--model-tar", str(manifest_tar(tmp_path / "n.tar.gz")))) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: the update rolled back: {endpoint} still serves {live_config} (Alarm ")


def test_update_of_ab_variants_keeps_names_and_takes_new_weights(
    clients: deployment.AwsClients, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = manifest_tar(tmp_path / "a.tar.gz", 0.30), manifest_tar(tmp_path / "b.tar.gz", 0.28)
    endpoint = live_endpoint(tmp_path, capsys, "--variant", f"a={a}:0.5", "--variant", f"b={b}:0.5",
                             "--data-capture", f"s3://{BUCKET}/capture")
    updates = EndpointUpdates(clients.sagemaker)
    a2, b2 = manifest_tar(tmp_path / "a2.tar.gz", 0.31), manifest_tar(tmp_path / "b2.tar.gz", 0.29)

    # Each variant is compared with the live model of the same name: b's 0.29 passes against b's 0.28.
    assert deployment_cli.main(update_args(endpoint, "--variant", f"a={a2}:0.8", "--variant", f"b={b2}:0.2",
                                           "--traffic", "linear", "--wait-interval-s", "300")) == 0
    [request] = updates.requests
    routing = request["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    assert routing == {"Type": "LINEAR", "WaitIntervalInSeconds": 300,
                       "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 10}}
    assert len(request["DeploymentConfig"]["AutoRollbackConfiguration"]["Alarms"]) == 4
    config = sagemaker().describe_endpoint_config(EndpointConfigName=request["EndpointConfigName"])
    new = config["EndpointConfigName"]
    assert {v["VariantName"]: (v["ModelName"], v["InitialVariantWeight"]) for v in config["ProductionVariants"]} == {
        "a": (f"{new}-a", 0.8), "b": (f"{new}-b", 0.2),
    }
    assert config["DataCaptureConfig"]["DestinationS3Uri"] == f"s3://{BUCKET}/capture"  # kept from the live config

    # Other names, or one model for two variants, are refused before anything is created.
    configs = len(sagemaker().list_endpoint_configs()["EndpointConfigs"])
    assert deployment_cli.main(update_args(endpoint, "--variant", f"a={a2}:1", "--variant", f"c={b2}:1")) == 1
    assert "--variant names a, c differ from the live endpoint's a, b" in capsys.readouterr().err
    assert deployment_cli.main(update_args(endpoint, "--model-tar", str(a2))) == 1
    assert f"endpoint {endpoint} serves variants a, b: give --variant" in capsys.readouterr().err
    assert len(sagemaker().list_endpoint_configs()["EndpointConfigs"]) == configs


def test_canary_on_a_single_instance_is_refused_and_all_at_once_is_not(live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint, _, updates = live
    new = str(manifest_tar(tmp_path / "n.tar.gz"))
    assert deployment_cli.main(update_args(endpoint, "--model-tar", new, "--instance-count", "1")) == 1
    assert "--traffic canary needs at least 2 instances per variant; AllTraffic would have 1" in capsys.readouterr().err
    assert deployment_cli.main(update_args(endpoint, "--model-tar", new, "--instance-count", "1",
                                           "--traffic", "all-at-once", "--wait-interval-s", "0")) == 0
    routing = updates.requests[0]["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    assert routing == {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}


def test_rollback_walks_back_the_recorded_configs(
    clients: deployment.AwsClients, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    endpoint = live_endpoint(tmp_path, capsys)
    first = config_of(endpoint)
    updates = EndpointUpdates(clients.sagemaker)

    assert deployment_cli.main(["rollback", endpoint, "--region", REGION]) == 1
    assert capsys.readouterr().err == (f"error: endpoint {endpoint} serves {first}, which records no previous endpoint "
                                       "config (only deploy --update records one); nothing to roll back to\n")

    assert deployment_cli.main(update_args(endpoint, "--model-tar", str(manifest_tar(tmp_path / "n.tar.gz")))) == 0
    second = updates.requests[-1]["EndpointConfigName"]
    capsys.readouterr()

    assert deployment_cli.main(["rollback", endpoint, "--region", REGION]) == 0
    assert capsys.readouterr().out == f"{first}\n"
    assert updates.requests[-1] == {
        "EndpointName": endpoint,
        "EndpointConfigName": first,
        "DeploymentConfig": {"BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
        }},
    }  # fmt: skip
    assert config_of(endpoint) == first
    assert second in [c["EndpointConfigName"] for c in sagemaker().list_endpoint_configs()["EndpointConfigs"]]

    assert deployment_cli.main(["rollback", endpoint, "--region", REGION]) == 1  # the first config records none
    assert deployment_cli.main(["rollback", "nope", "--region", REGION]) == 1
    assert capsys.readouterr().err.endswith("error: endpoint nope does not exist\n")


def test_rollback_refuses_when_the_previous_config_is_gone(live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint, first, updates = live
    assert deployment_cli.main(update_args(endpoint, "--model-tar", str(manifest_tar(tmp_path / "n.tar.gz")))) == 0
    sagemaker().delete_endpoint_config(EndpointConfigName=first)
    capsys.readouterr()
    assert deployment_cli.main(["rollback", endpoint, "--region", REGION]) == 1
    assert capsys.readouterr().err == f"error: the previous endpoint config {first} of {endpoint} no longer exists\n"
    assert len(updates.requests) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--name", "x"], "--name is for a new endpoint"),
        (["--autoscale", "1", "2"], "--autoscale is for a new endpoint"),
        (["--step-percent", "60"], "--step-percent for --traffic canary must be between 1 and 50"),
        (["--traffic", "linear", "--step-percent", "5"], "for --traffic linear must be between 10 and 50"),
        (["--wait-interval-s", "3601"], "--wait-interval-s must be between 0 and 3600"),
        (["--traffic", "linear", "--wait-interval-s", "3600"], "exceed SageMaker's 28800 s limit"),
        (["--latency-p99-ms", "0"], "--latency-p99-ms must be a positive number"),
        (["--gate-tolerance", "-0.1"], "--gate-tolerance must be a number >= 0"),
        (["--instance-count", "0"], "--instance-count must be at least 1"),
    ],
)
def test_bad_update_arguments_exit_2_before_any_aws_call(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["deploy", "--update", "recs", "--model-data-url", "s3://bucket/m.tar.gz", "--region", REGION, *extra]
    assert deployment_cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_traffic_policies_and_update_names() -> None:
    assert TrafficPolicy("linear", 20, 60).shifts == 5
    assert TrafficPolicy("linear", 30, 60).shifts == 4  # 30, 60, 90, 100
    assert TrafficPolicy("all-at-once", 10, 0).deployment_config(["x"])["BlueGreenUpdatePolicy"][
        "MaximumExecutionTimeoutInSeconds"
    ] == 1800
    when = datetime(2026, 2, 1, 9, 0, 0, tzinfo=timezone.utc)
    assert endpoint_update.update_name("recs-20260101-120000", ["AllTraffic"], when) == "recs-20260201-090000"
    long = "e" * 63
    name = endpoint_update.update_name(long, ["control", "challenger"], when)
    assert len(f"{name}-challenger") <= 63 and name.endswith("-20260201-090000")


def test_a_live_archive_gone_from_s3_refuses_unless_forced(
    clients: deployment.AwsClients, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = live_endpoint(tmp_path, capsys)
    live_config = config_of(endpoint)
    clients.s3.delete_object(Bucket=BUCKET, Key=f"twostage-rec/models/{live_config}/model.tar.gz")
    updates = EndpointUpdates(clients.sagemaker)
    new = str(manifest_tar(tmp_path / "n.tar.gz"))
    assert deployment_cli.main(update_args(endpoint, "--model-tar", new)) == 3
    assert f"AllTraffic: s3://{BUCKET}/twostage-rec/models/{live_config}/model.tar.gz: NoSuchKey" in (
        capsys.readouterr().err
    )
    assert deployment_cli.main(update_args(endpoint, "--model-tar", new, "--force")) == 0
    assert len(updates.requests) == 1


def test_start_update_sends_update_endpoint_as_the_service_model_has_it() -> None:
    """The same request through botocore's Stubber alone: parameters checked against SageMaker's model."""
    from botocore.stub import Stubber

    client = boto3.client("sagemaker", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    deployment_config = TrafficPolicy().deployment_config(["a-5xx", "a-p99"])
    with Stubber(client) as stub:
        stub.add_response("update_endpoint", {"EndpointArn": "arn:aws:sagemaker:eu-west-1:1:endpoint/recs"},
                          {"EndpointName": "recs", "EndpointConfigName": "recs-2",
                           "DeploymentConfig": deployment_config})  # fmt: skip
        endpoint_update.start_update(client, "recs", "recs-2", deployment_config, ["recs-2"], "recs-1")
        stub.assert_no_pending_responses()
