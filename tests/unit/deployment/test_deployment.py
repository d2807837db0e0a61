"""``training.deployment`` against moto: S3, SageMaker, sagemaker-runtime, Application Auto Scaling.

moto's SageMaker predates ml.c7i instance types, so the end-to-end tests deploy ml.c5.large; the
default itself is checked on the parsed arguments. moto answers invoke_endpoint with a canned body.
"""

from __future__ import annotations

import io
import tarfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sagemakerruntime.models import sagemakerruntime_backends

from tests.support.sagemaker_fakes import BUCKET, IMAGE, REGION, ROLE
from training import deployment, deployment_cli

CANNED_ANSWER = '{"user_id": "alice", "recommendations": []}'


@pytest.fixture
def invocations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str | None]]:
    """(endpoint, user id, target variant) of every sample invocation; the real call still goes to moto."""
    calls: list[tuple[str, str, str | None]] = []
    real = deployment.invoke

    def recording(runtime: object, endpoint: str, user_id: str, top_k: int = 5, **options: Any) -> str:
        calls.append((endpoint, user_id, options.get("target_variant")))
        return real(runtime, endpoint, user_id, top_k, **options)

    monkeypatch.setattr(deployment, "invoke", recording)
    return calls


def json_answer(body: bytes) -> dict[str, Any]:
    """invoke_endpoint's response carrying ``body``, for a Stubber."""
    return {"Body": StreamingBody(io.BytesIO(body), len(body)), "ContentType": "application/json"}


def deploy_args(model_tar: Path, *extra: str) -> list[str]:
    return [
        "deploy", "--name", "recs", "--image-uri", IMAGE, "--role-arn", ROLE, "--region", REGION,
        "--model-tar", str(model_tar), "--bucket", BUCKET, "--instance-type", "ml.c5.large", *extra,
    ]  # fmt: skip


def deployed_endpoint(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """(sample answer, endpoint name) from deploy's stdout."""
    answer, name = capsys.readouterr().out.strip().splitlines()
    return answer, name


def test_deploy_creates_model_config_endpoint_autoscaling_and_invokes(
    aws: None, model_tar: Path, invocations: list[tuple[str, str, str | None]], capsys: pytest.CaptureFixture[str]
) -> None:
    runtime_backend = sagemakerruntime_backends[DEFAULT_ACCOUNT_ID][REGION]
    runtime_backend.results_queue.append((CANNED_ANSWER, "application/json", "AllTraffic", ""))

    status = deployment_cli.main(
        deploy_args(model_tar, "--feature-group-name", "items", "--user-history-group-name", "history",
                    "--workers", "2", "--env", "FEATURE_CACHE_TTL_S=60",
                    "--autoscale", "1", "3", "--target-invocations", "150")
    )  # fmt: skip

    assert status == 0
    answer, name = deployed_endpoint(capsys)
    assert answer == CANNED_ANSWER
    assert name.startswith("recs-") and len(name) == len("recs-20260101-120000")
    key = f"twostage-rec/models/{name}/model.tar.gz"
    s3 = boto3.client("s3", region_name=REGION)
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == model_tar.read_bytes()

    sm = boto3.client("sagemaker", region_name=REGION)
    container = sm.describe_model(ModelName=name)["PrimaryContainer"]
    assert container["Image"] == IMAGE
    assert container["ModelDataUrl"] == f"s3://{BUCKET}/{key}"
    assert container["Environment"] == {
        "AWS_REGION": REGION,
        "FEATURE_GROUP_NAME": "items",
        "USER_HISTORY_FEATURE_GROUP_NAME": "history",
        "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
        "FEATURE_CACHE_TTL_S": "60",
    }
    [variant] = sm.describe_endpoint_config(EndpointConfigName=name)["ProductionVariants"]
    assert (variant["VariantName"], variant["ModelName"]) == ("AllTraffic", name)
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.c5.large", 1)
    endpoint = sm.describe_endpoint(EndpointName=name)
    assert (endpoint["EndpointConfigName"], endpoint["EndpointStatus"]) == (name, "InService")

    autoscaling = boto3.client("application-autoscaling", region_name=REGION)
    resource_id = f"endpoint/{name}/variant/AllTraffic"
    [target] = autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource_id])[
        "ScalableTargets"
    ]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 3)
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    [policy] = autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource_id)[
        "ScalingPolicies"
    ]
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert tracking["TargetValue"] == 150.0
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"

    assert invocations == [(name, "alice", None)]  # the first user in the archive's id table


def test_teardown_deletes_everything_and_is_idempotent(
    aws: None, model_tar: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert deployment_cli.main(deploy_args(model_tar, "--autoscale", "1", "2")) == 0
    _, name = deployed_endpoint(capsys)

    assert deployment_cli.main(["teardown", "--endpoint-name", name, "--region", REGION]) == 0
    deleted = capsys.readouterr().err
    for piece in (f"autoscaling target endpoint/{name}/variant/AllTraffic", f"endpoint {name}",
                  f"endpoint config {name}", f"model {name}"):  # fmt: skip
        assert f"deleted {piece}\n" in deleted

    sm = boto3.client("sagemaker", region_name=REGION)
    assert sm.list_endpoints()["Endpoints"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert sm.list_models()["Models"] == []
    autoscaling = boto3.client("application-autoscaling", region_name=REGION)
    assert autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []

    assert deployment_cli.main(["teardown", "--endpoint-name", name, "--region", REGION]) == 0
    assert "deleted" not in capsys.readouterr().err


def test_deploy_from_an_s3_url_without_autoscaling(
    aws: None, invocations: list[tuple[str, str, str | None]], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"s3://{BUCKET}/already/model.tar.gz"
    status = deployment_cli.main([
        "deploy", "--name", "recs", "--image-uri", IMAGE, "--role-arn", ROLE, "--region", REGION,
        "--model-data-url", url, "--instance-type", "ml.c5.large", "--sample-user", "bob",
    ])  # fmt: skip
    assert status == 0
    _, name = deployed_endpoint(capsys)
    sm = boto3.client("sagemaker", region_name=REGION)
    assert sm.describe_model(ModelName=name)["PrimaryContainer"]["ModelDataUrl"] == url
    autoscaling = boto3.client("application-autoscaling", region_name=REGION)
    assert autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert invocations == [(name, "bob", None)]


def test_invoke_sends_a_json_request_and_returns_the_body() -> None:
    runtime = boto3.client("sagemaker-runtime", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    body = CANNED_ANSWER.encode()
    with Stubber(runtime) as stub:
        stub.add_response(
            "invoke_endpoint",
            json_answer(body),
            {
                "EndpointName": "recs-1",
                "ContentType": "application/json",
                "Accept": "application/json",
                "Body": b'{"user_id": "alice", "top_k": 5}',
            },
        )
        assert deployment.invoke(runtime, "recs-1", "alice") == CANNED_ANSWER


def test_a_missing_bucket_is_one_line_and_exit_1(aws: None, model_tar: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = deploy_args(model_tar)
    args[args.index(BUCKET)] = "no-such-bucket"
    assert deployment_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "no-such-bucket" in err and "Traceback" not in err
    assert "teardown --endpoint-name recs-" in err
    assert boto3.client("sagemaker", region_name=REGION).list_models()["Models"] == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--autoscale", "3", "1"], "need 1 <= MIN <= MAX"),
        (["--autoscale", "2", "3"], "--instance-count 1 is outside --autoscale 2 3"),
        (["--env", "NOEQUALS"], "expected KEY=VALUE"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_arguments_exit_2_before_any_aws_call(
    extra: list[str], message: str, model_tar: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert deployment_cli.main(deploy_args(model_tar, *extra)) == 2
    assert message in capsys.readouterr().err


def test_model_tar_needs_a_bucket_and_a_region_is_required(
    model_tar: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = deploy_args(model_tar)
    del args[args.index("--bucket") : args.index("--bucket") + 2]
    assert deployment_cli.main(args) == 2
    assert "--model-tar needs --bucket" in capsys.readouterr().err

    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert deployment_cli.main(["teardown", "--endpoint-name", "x"]) == 2
    assert "no region" in capsys.readouterr().err


def test_deployment_name_is_timestamped_and_validated() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert deployment.deployment_name("recs", when) == "recs-20260102-030405"
    for bad in ("", "-recs", "recs_1", "r" * 48):
        with pytest.raises(deployment.DeploymentError, match="--name"):
            deployment.deployment_name(bad, when)
    assert deployment.deployment_name("r" * 47, when).endswith("-20260102-030405")


def test_defaults(model_tar: Path) -> None:
    args = deployment_cli._parser().parse_args(
        ["deploy", "--name", "recs", "--image-uri", IMAGE, "--role-arn", ROLE, "--model-tar", str(model_tar),
         "--bucket", BUCKET]
    )  # fmt: skip
    spec = deployment_cli.spec_from_args(args, REGION, datetime(2026, 1, 2, tzinfo=timezone.utc))
    assert spec.instance_type == "ml.c7i.large" and spec.instance_count == 1
    assert spec.name == "recs-20260102-000000"
    assert spec.environment == {} and spec.autoscaling is None
    assert spec.sample_user_id == "alice"  # the first user in the archive's id table


def test_first_user_id_tolerates_archives_without_users(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    assert deployment.first_user_id(empty) is None
    assert deployment.first_user_id(tmp_path / "missing.tar.gz") is None


def test_deploy_with_two_variants_and_data_capture(
    aws: None, model_tar: Path, invocations: list[tuple[str, str, str | None]], capsys: pytest.CaptureFixture[str]
) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    s3.upload_file(str(model_tar), BUCKET, "challenger/model.tar.gz")
    status = deployment_cli.main([
        "deploy", "--name", "recs", "--image-uri", IMAGE, "--role-arn", ROLE, "--region", REGION,
        "--bucket", BUCKET, "--instance-type", "ml.c5.large", "--autoscale", "1", "2",
        "--variant", f"control={model_tar}:0.9", "--variant", f"challenger=s3://{BUCKET}/challenger/model.tar.gz:0.1",
        "--data-capture", f"s3://{BUCKET}/capture", "--capture-percent", "25",
    ])  # fmt: skip

    assert status == 0
    *answers, name = capsys.readouterr().out.strip().splitlines()
    assert len(answers) == 2
    sm = boto3.client("sagemaker", region_name=REGION)
    config = sm.describe_endpoint_config(EndpointConfigName=name)
    variants = {v["VariantName"]: v for v in config["ProductionVariants"]}
    assert {v: (p["ModelName"], p["InitialVariantWeight"]) for v, p in variants.items()} == {
        "control": (f"{name}-control", 0.9),
        "challenger": (f"{name}-challenger", 0.1),
    }
    assert sm.describe_model(ModelName=f"{name}-control")["PrimaryContainer"]["ModelDataUrl"] == (
        f"s3://{BUCKET}/twostage-rec/models/{name}/control/model.tar.gz"
    )
    assert sm.describe_model(ModelName=f"{name}-challenger")["PrimaryContainer"]["ModelDataUrl"] == (
        f"s3://{BUCKET}/challenger/model.tar.gz"
    )
    assert config["DataCaptureConfig"] == {
        "EnableCapture": True,
        "InitialSamplingPercentage": 25,
        "DestinationS3Uri": f"s3://{BUCKET}/capture",
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": {
            "JsonContentTypes": ["application/json", "application/jsonlines", "application/x-jsonlines"]
        },
    }
    autoscaling = boto3.client("application-autoscaling", region_name=REGION)
    targets = autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert sorted(t["ResourceId"] for t in targets) == [
        f"endpoint/{name}/variant/challenger", f"endpoint/{name}/variant/control"
    ]
    assert invocations == [(name, "alice", "control"), (name, "alice", "challenger")]

    assert deployment_cli.main(["teardown", "--endpoint-name", name, "--region", REGION]) == 0
    assert sm.list_models()["Models"] == [] and sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--variant", "a"], "expected NAME=MODEL_TAR:WEIGHT"),
        (["--variant", "a=s3://bucket/model.tar.gz"], "expected NAME=MODEL_TAR:WEIGHT"),
        (["--variant", "a_b=s3://bucket/m.tar.gz:1"], "the name must be letters, digits and hyphens"),
        (["--variant", "a=s3://bucket/m.tar.gz:-1"], "the weight must be a number >= 0"),
        (["--variant", "a=s3://bucket/m.tar.gz:nan"], "the weight must be a number >= 0"),
        (["--variant", "a=s3://b/m.tar.gz:1"], "expected an s3://bucket/prefix URI"),
        (["--variant", "a=s3://bucket/m.tar.gz:1", "--variant", "a=s3://bucket/n.tar.gz:1"], "names must differ"),
        (["--variant", "a=s3://bucket/m.tar.gz:0", "--variant", "b=s3://bucket/n.tar.gz:0"], "must not all be 0"),
        (["--variant", "a=missing.tar.gz:1", "--bucket", BUCKET], "missing.tar.gz: model archive not found"),
        (["--variant", "a=missing.tar.gz:1"], "--variant needs --bucket"),
        (["--variant", "a=s3://bucket/m.tar.gz:1", "--model-data-url", "s3://bucket/m.tar.gz"], "not both"),
        ([], "give the model"),
        (["--model-data-url", "s3://bucket/m.tar.gz", "--data-capture", "bucket/capture"],
         "--data-capture 'bucket/capture': expected an s3://"),
        (["--model-data-url", "s3://bucket/m.tar.gz", "--capture-percent", "0"], "between 1 and 100"),
        (["--model-data-url", "s3://bucket/m.tar.gz", "--variant", "a=s3://bucket/m.tar.gz:1"], "not both"),
    ],
)
def test_variant_and_capture_arguments_exit_2_with_one_line(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["deploy", "--name", "recs", "--image-uri", IMAGE, "--role-arn", ROLE, "--region", REGION, *extra]
    assert deployment_cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_new_endpoint_needs_name_image_and_role(capsys: pytest.CaptureFixture[str]) -> None:
    assert deployment_cli.main(["deploy", "--region", REGION, "--model-data-url", "s3://bucket/m.tar.gz"]) == 2
    assert "a new endpoint needs --name, --image-uri, --role-arn (or --update ENDPOINT" in capsys.readouterr().err


def stubbed_runtime(monkeypatch: pytest.MonkeyPatch) -> Stubber:
    """A sagemaker-runtime client with a Stubber, handed to the commands as their clients."""
    runtime = boto3.client("sagemaker-runtime", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    made = deployment.AwsClients(s3=None, sagemaker=None, runtime=runtime, autoscaling=None, cloudwatch=None)
    monkeypatch.setattr(deployment.AwsClients, "create", classmethod(lambda cls, region: made))
    return Stubber(runtime)


def test_invoke_command_targets_a_variant_and_prints_the_answer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = b'{"user_id": "42", "recommendations": [], "model_version": "v2"}'
    with stubbed_runtime(monkeypatch) as stub:
        stub.add_response(
            "invoke_endpoint",
            json_answer(answer),
            {
                "EndpointName": "recs-1",
                "ContentType": "application/json",
                "Accept": "application/json",
                "TargetVariant": "challenger",
                "Body": b'{"user_id": "42", "top_k": 3, "as_of": 1700000000}',
            },
        )
        status = deployment_cli.main(["invoke", "--endpoint", "recs-1", "--user-id", "42", "--top-k", "3",
                                      "--target-variant", "challenger", "--as-of", "1700000000", "--region", REGION])
        stub.assert_no_pending_responses()
    assert status == 0
    assert capsys.readouterr().out == answer.decode() + "\n"


def test_invoke_command_reports_the_containers_4xx_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    body = '{"error": "user_not_found", "message": "unknown user_id \'zz\'", "request_id": "r1"}'
    with stubbed_runtime(monkeypatch) as stub:
        stub.add_client_error(
            "invoke_endpoint", service_error_code="ModelError", http_status_code=424,
            service_message="Received client error (404) from primary with message \"...\". See the logs.",
            modeled_fields={"OriginalStatusCode": 404, "OriginalMessage": body},
        )  # fmt: skip
        status = deployment_cli.main(["invoke", "--endpoint", "recs-1", "--user-id", "zz", "--region", REGION])
    assert status == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: endpoint answered 404 user_not_found: unknown user_id 'zz'\n"


def test_invoke_command_reports_an_unknown_variant_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with stubbed_runtime(monkeypatch) as stub:
        stub.add_client_error("invoke_endpoint", service_error_code="ValidationError", http_status_code=400,
                              service_message="Variant nope not found\nfor endpoint recs-1")
        status = deployment_cli.main(["invoke", "--endpoint", "recs-1", "--user-id", "1", "--target-variant", "nope",
                                      "--region", REGION])
    assert status == 1
    assert capsys.readouterr().err == (
        "error: InvokeEndpoint: ValidationError: Variant nope not found for endpoint recs-1\n"
    )


def test_invoke_command_checks_top_k_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    assert deployment_cli.main(["invoke", "--endpoint", "e", "--user-id", "1", "--top-k", "0", "--region", REGION]) == 2
    assert "--top-k must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["deploy", "rollback", "invoke", "transform", "teardown"])
def test_every_command_answers_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from training.__main__ import main as training_main

    with pytest.raises(SystemExit) as exited:
        training_main([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: python -m training {command}" in capsys.readouterr().out


def test_waiting_polls_until_the_endpoint_settles_even_when_its_rollback_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """boto3's endpoint_in_service waiter would poll an UpdateRollbackFailed endpoint until its deadline."""
    sagemaker = boto3.client("sagemaker", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    sleeps: list[float] = []
    monkeypatch.setattr(deployment.time, "sleep", sleeps.append)
    described = {"EndpointName": "recs-1", "EndpointArn": "arn:aws:sagemaker:eu-west-1:1:endpoint/recs-1",
                 "CreationTime": datetime(2026, 1, 1), "LastModifiedTime": datetime(2026, 1, 1)}  # fmt: skip
    with Stubber(sagemaker) as stub:
        for status in ("Updating", "RollingBack", "UpdateRollbackFailed"):
            stub.add_response("describe_endpoint", {**described, "EndpointStatus": status,
                                                    "FailureReason": "the old fleet\nfailed too"})
        with pytest.raises(deployment.DeploymentError) as failed:
            deployment.wait_in_service(sagemaker, "recs-1", minutes=5)
        stub.assert_no_pending_responses()
    assert str(failed.value) == "endpoint recs-1 is UpdateRollbackFailed, not InService: the old fleet failed too"
    assert sleeps == [30.0, 30.0]
