"""``training.deployment`` against moto: S3, SageMaker, sagemaker-runtime, Application Auto Scaling.

moto's SageMaker predates ml.c7i instance types, so the end-to-end tests deploy ml.c5.large; the
default itself is checked on the parsed arguments. moto answers invoke_endpoint with a canned body.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sagemakerruntime.models import sagemakerruntime_backends

from training import deployment
from twostage_rec.artifact import pack_model_tar

REGION = "eu-west-1"
BUCKET = "models-bucket"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/twostage-rec:abc1234"
CANNED_ANSWER = '{"user_id": "alice", "recommendations": []}'


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        boto3.client("s3", region_name=REGION).create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        yield


@pytest.fixture
def invocations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(endpoint, user id) of every sample invocation; the real call still goes to moto."""
    calls: list[tuple[str, str]] = []
    real = deployment.invoke

    def recording(runtime: object, endpoint: str, user_id: str, top_k: int = 5) -> str:
        calls.append((endpoint, user_id))
        return real(runtime, endpoint, user_id, top_k)

    monkeypatch.setattr(deployment, "invoke", recording)
    return calls


@pytest.fixture(scope="module")
def model_tar(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return pack_model_tar(tiny_model_dir, tmp_path_factory.mktemp("tar") / "model.tar.gz")


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
    aws: None, model_tar: Path, invocations: list[tuple[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    runtime_backend = sagemakerruntime_backends[DEFAULT_ACCOUNT_ID][REGION]
    runtime_backend.results_queue.append((CANNED_ANSWER, "application/json", "AllTraffic", ""))

    status = deployment.main(
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

    assert invocations == [(name, "alice")]  # the first user in the archive's id table


def test_teardown_deletes_everything_and_is_idempotent(
    aws: None, model_tar: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert deployment.main(deploy_args(model_tar, "--autoscale", "1", "2")) == 0
    _, name = deployed_endpoint(capsys)

    assert deployment.main(["teardown", "--endpoint-name", name, "--region", REGION]) == 0
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

    assert deployment.main(["teardown", "--endpoint-name", name, "--region", REGION]) == 0
    assert "deleted" not in capsys.readouterr().err


def test_deploy_from_an_s3_url_without_autoscaling(
    aws: None, invocations: list[tuple[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"s3://{BUCKET}/already/model.tar.gz"
    status = deployment.main([
        "deploy", "--name", "recs", "--image-uri", IMAGE, "--role-arn", ROLE, "--region", REGION,
        "--model-data-url", url, "--instance-type", "ml.c5.large", "--sample-user", "bob",
    ])  # fmt: skip
    assert status == 0
    _, name = deployed_endpoint(capsys)
    sm = boto3.client("sagemaker", region_name=REGION)
    assert sm.describe_model(ModelName=name)["PrimaryContainer"]["ModelDataUrl"] == url
    autoscaling = boto3.client("application-autoscaling", region_name=REGION)
    assert autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert invocations == [(name, "bob")]


def test_invoke_sends_a_json_request_and_returns_the_body() -> None:
    runtime = boto3.client("sagemaker-runtime", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    body = CANNED_ANSWER.encode()
    with Stubber(runtime) as stub:
        stub.add_response(
            "invoke_endpoint",
            {"Body": StreamingBody(io.BytesIO(body), len(body)), "ContentType": "application/json"},
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
    assert deployment.main(args) == 1
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
    assert deployment.main(deploy_args(model_tar, *extra)) == 2
    assert message in capsys.readouterr().err


def test_model_tar_needs_a_bucket_and_a_region_is_required(
    model_tar: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = deploy_args(model_tar)
    del args[args.index("--bucket") : args.index("--bucket") + 2]
    assert deployment.main(args) == 2
    assert "--model-tar needs --bucket" in capsys.readouterr().err

    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert deployment.main(["teardown", "--endpoint-name", "x"]) == 2
    assert "no region" in capsys.readouterr().err


def test_deployment_name_is_timestamped_and_validated() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert deployment.deployment_name("recs", when) == "recs-20260102-030405"
    for bad in ("", "-recs", "recs_1", "r" * 48):
        with pytest.raises(deployment.DeploymentError, match="--name"):
            deployment.deployment_name(bad, when)
    assert deployment.deployment_name("r" * 47, when).endswith("-20260102-030405")


def test_defaults(model_tar: Path) -> None:
    args = deployment._parser().parse_args(
        ["deploy", "--name", "recs", "--image-uri", IMAGE, "--role-arn", ROLE, "--model-tar", str(model_tar),
         "--bucket", BUCKET]
    )  # fmt: skip
    spec = deployment.spec_from_args(args, REGION, datetime(2026, 1, 2, tzinfo=timezone.utc))
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
