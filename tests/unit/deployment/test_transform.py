"""``python -m training transform``: the CreateTransformJob request on moto, waiting, and its checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto.sagemaker.models import SageMakerModelBackend

from tests.support.sagemaker_fakes import BUCKET, IMAGE, REGION, ROLE
from training import deployment, deployment_cli

INPUT = f"s3://{BUCKET}/requests/"
OUTPUT = f"s3://{BUCKET}/answers/"


def transform_args(*extra: str) -> list[str]:
    return ["transform", "--input", INPUT, "--output", OUTPUT, "--instance-type", "ml.m5.large", "--region", REGION,
            *extra]  # fmt: skip


def test_transform_of_an_existing_model_sends_every_field(
    clients: deployment.AwsClients, capsys: pytest.CaptureFixture[str]
) -> None:
    status = deployment_cli.main(transform_args("--model", "recs-20260101-120000", "--instance-count", "3",
                                                "--max-concurrent-transforms", "2", "--env", "FEATURE_SOURCE=embedded"))
    assert status == 0
    job = capsys.readouterr().out.strip()
    assert job.startswith("twostage-batch-")
    described = clients.sagemaker.describe_transform_job(TransformJobName=job)
    assert described["ModelName"] == "recs-20260101-120000"
    assert (described["BatchStrategy"], described["MaxPayloadInMB"], described["MaxConcurrentTransforms"]) == (
        "MultiRecord", 6, 2
    )
    assert described["TransformInput"] == {
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": INPUT}},
        "ContentType": "application/jsonlines",
        "SplitType": "Line",
    }
    assert described["TransformOutput"] == {
        "S3OutputPath": OUTPUT, "Accept": "application/jsonlines", "AssembleWith": "Line"
    }
    assert described["TransformResources"] == {"InstanceType": "ml.m5.large", "InstanceCount": 3}
    # The container's body limit follows the mini-batch size.
    assert described["Environment"] == {"FEATURE_SOURCE": "embedded", "MAX_REQUEST_BYTES": str(6 << 20)}
    assert clients.sagemaker.list_models()["Models"] == []


def test_transform_from_a_local_archive_creates_the_model_and_waits(
    clients: deployment.AwsClients, model_tar: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = deployment_cli.main(transform_args("--model-tar", str(model_tar), "--bucket", BUCKET, "--image-uri", IMAGE,
                                                "--role-arn", ROLE, "--max-payload-mb", "20", "--wait"))
    assert status == 0
    job, final = capsys.readouterr().out.strip().splitlines()
    assert final == f"Completed {OUTPUT}"
    model = clients.sagemaker.describe_model(ModelName=job)
    assert model["PrimaryContainer"]["Image"] == IMAGE and model["ExecutionRoleArn"] == ROLE
    key = f"twostage-rec/models/{job}/model.tar.gz"
    assert model["PrimaryContainer"]["ModelDataUrl"] == f"s3://{BUCKET}/{key}"
    assert clients.s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"] == model_tar.stat().st_size
    described = clients.sagemaker.describe_transform_job(TransformJobName=job)
    assert (described["ModelName"], described["MaxPayloadInMB"]) == (job, 20)
    assert described["Environment"]["MAX_REQUEST_BYTES"] == str(20 << 20)


def test_a_failed_job_prints_its_reason_and_exits_1(
    clients: deployment.AwsClients, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = SageMakerModelBackend.create_transform_job

    def failing(backend: SageMakerModelBackend, **kwargs: Any) -> Any:
        job = real(backend, **kwargs)
        job.transform_job_status, job.failure_reason = "Failed", "ClientError: 413 from the container\non line 7"
        return job

    monkeypatch.setattr(SageMakerModelBackend, "create_transform_job", failing)
    assert deployment_cli.main(transform_args("--model", "recs-1", "--wait")) == 1
    captured = capsys.readouterr()
    job = captured.out.strip()
    assert captured.err.strip().splitlines()[-1] == (
        f"error: transform job {job} Failed: ClientError: 413 from the container on line 7"
    )


def test_a_job_that_does_not_start_removes_the_model_it_created(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sagemaker = boto3.client("sagemaker", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    made = deployment.AwsClients(s3=None, sagemaker=sagemaker, runtime=None, autoscaling=None, cloudwatch=None)
    monkeypatch.setattr(deployment.AwsClients, "create", classmethod(lambda cls, region: made))
    model_url = f"s3://{BUCKET}/m/model.tar.gz"
    with Stubber(sagemaker) as stub:
        stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:eu-west-1:123456789012:model/x"},
                          {"ModelName": ANY, "ExecutionRoleArn": ROLE, "PrimaryContainer": {
                              "Image": IMAGE, "ModelDataUrl": model_url, "Environment": {"AWS_REGION": REGION}}})
        stub.add_client_error("create_transform_job", "ResourceLimitExceeded", "no ml.m5.large left for transform")
        stub.add_response("delete_model", {}, {"ModelName": ANY})
        status = deployment_cli.main(transform_args("--model-tar", model_url, "--image-uri", IMAGE, "--role-arn", ROLE))
        stub.assert_no_pending_responses()
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: CreateTransformJob: ResourceLimitExceeded: no ml.m5.large left for transform"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "m", "--instance-count", "0"], "--instance-count must be at least 1"),
        (["--model", "m", "--max-payload-mb", "0"], "--max-payload-mb must be between 1 and 100"),
        (["--model", "m", "--max-payload-mb", "101"], "--max-payload-mb must be between 1 and 100"),
        (["--model", "m", "--max-concurrent-transforms", "0"], "--max-concurrent-transforms must be at least 1"),
        (["--model", "m", "--max-concurrent-transforms", "17"], "times --max-payload-mb at most 100"),
        (["--model", "m", "--env", "X"], "--env 'X': expected KEY=VALUE"),
        (["--model-tar", "s3://bucket/m.tar.gz"], "--model-tar creates a Model: give --image-uri and --role-arn"),
        (["--model-tar", "m.tar.gz", "--image-uri", IMAGE, "--role-arn", ROLE], "a local --model-tar needs --bucket"),
        (["--model-tar", "missing.tar.gz", "--image-uri", IMAGE, "--role-arn", ROLE, "--bucket", BUCKET],
         "missing.tar.gz: model archive not found"),
        (["--model-tar", "s3://x/m.tar.gz", "--image-uri", IMAGE, "--role-arn", ROLE], "--model-tar 's3://x/m.tar.gz'"),
    ],
)
def test_bad_transform_arguments_exit_2_with_one_line(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert deployment_cli.main(transform_args(*extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("input_uri", "output_uri", "message"),
    [
        ("bucket/requests", OUTPUT, "--input 'bucket/requests': expected an s3://bucket/prefix URI"),
        (INPUT, "https://example.com/out", "--output 'https://example.com/out': expected an s3://"),
        (INPUT, f"s3://{BUCKET}/requests/answers/", "is inside --input"),
        (f"s3://{BUCKET}", f"s3://{BUCKET}/answers", "is inside --input"),
        (f"s3://{BUCKET}/req", f"s3://{BUCKET}/req-answers/", "is inside --input"),  # S3Prefix: a raw key prefix
    ],
)
def test_input_and_output_locations_are_checked(
    input_uri: str, output_uri: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["transform", "--model", "m", "--input", input_uri, "--output", output_uri, "--instance-type",
            "ml.m5.large", "--region", REGION]  # fmt: skip
    assert deployment_cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_a_sibling_folder_is_not_inside_the_input(clients: deployment.AwsClients) -> None:
    args = ["transform", "--model", "m", "--input", f"s3://{BUCKET}/req/", "--output", f"s3://{BUCKET}/req-answers/",
            "--instance-type", "ml.m5.large", "--region", REGION]  # fmt: skip
    assert deployment_cli.main(args) == 0
