"""``python -m training launch``: the SageMaker SDK's requests, with its AWS calls stubbed.

The session is a real ``sagemaker.Session`` on real boto3 clients wrapped in botocore's Stubber:
botocore still validates every request against the service model, so the CreateTrainingJob
request asserted here has the shape AWS accepts.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

sagemaker = pytest.importorskip("sagemaker", reason="the launch extra (requirements/launch.txt) is not installed")

import boto3
from botocore.stub import Stubber

from training import launch
from training.__main__ import main

REGION = "eu-west-1"
ROLE = "arn:aws:iam::111122223333:role/SageMakerRole"
JOB_ARN = f"arn:aws:sagemaker:{REGION}:111122223333:training-job/recs-1"


@dataclass
class Aws:
    """The stubbed clients of one SageMaker session and what was sent."""

    session: Any
    s3_list: Stubber
    s3_upload: Stubber
    sagemaker: Stubber
    sent: dict[str, Any] = field(default_factory=dict)
    uploaded: dict[str, bytes] = field(default_factory=dict)

    def objects(self, bucket: str, key: str, keys: list[str], size: int = 100) -> None:
        contents = [{"Key": k, "Size": size} for k in keys]
        self.s3_list.add_response("list_objects_v2", {"Contents": contents, "KeyCount": len(keys)},
                                  {"Bucket": bucket, "Prefix": key, "MaxKeys": 2})


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Aws]:
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    boto_session = boto3.session.Session(region_name=REGION)
    session = sagemaker.Session(boto_session=boto_session, sagemaker_client=boto_session.client("sagemaker"),
                                sagemaker_config=launch.SDK_CONFIG)
    stubs = Aws(session, Stubber(session.s3_client), Stubber(session.s3_resource.meta.client),
                Stubber(session.sagemaker_client))

    def record_job(params: dict[str, Any], **_: Any) -> None:
        stubs.sent["CreateTrainingJob"] = params

    def record_upload(params: dict[str, Any], **_: Any) -> None:
        stubs.uploaded[params["Key"]] = params["Body"].read()

    session.sagemaker_client.meta.events.register("provide-client-params.sagemaker.CreateTrainingJob", record_job)
    session.s3_resource.meta.client.meta.events.register("provide-client-params.s3.PutObject", record_upload)
    monkeypatch.setattr(launch, "make_session", lambda region: session)
    with stubs.s3_list, stubs.s3_upload, stubs.sagemaker:
        yield stubs


def _argv(*extra: str, count: str = "2", instance: str = "ml.c6i.4xlarge") -> list[str]:
    return ["launch", "--role-arn", ROLE, "--region", REGION, "--instance-type", instance, "--instance-count", count,
            "--output-path", "s3://bucket/jobs", *extra]


def test_launch_creates_a_multi_instance_torch_distributed_job(aws: Aws, capsys: pytest.CaptureFixture[str]) -> None:
    aws.objects("bucket", "data/inter.csv", ["data/inter.csv"])
    aws.objects("bucket", "data/items.csv", ["data/items.csv"])
    aws.s3_upload.add_response("put_object", {})
    aws.sagemaker.add_response("create_training_job", {"TrainingJobArn": JOB_ARN})

    argv = _argv("--interactions", "s3://bucket/data/inter.csv", "--items", "s3://bucket/data/items.csv",
                 "--job-name", "recs-1", "--", "--epochs", "30", "--no-ablations", "--column", "user_id=customer")
    assert main(argv) == 0
    assert "training job recs-1 started (2 x ml.c6i.4xlarge)" in capsys.readouterr().out
    aws.sagemaker.assert_no_pending_responses()

    request = aws.sent["CreateTrainingJob"]
    assert request["TrainingJobName"] == "recs-1"
    assert request["ResourceConfig"]["InstanceType"] == "ml.c6i.4xlarge"
    assert request["ResourceConfig"]["InstanceCount"] == 2
    image = request["AlgorithmSpecification"]["TrainingImage"]
    assert image.startswith("763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:2.8.0-cpu-py312"), image
    hyper = {k: json.loads(v) for k, v in request["HyperParameters"].items()}
    assert hyper["sagemaker_torch_distributed_enabled"] is True  # the SDK's torchrun launcher
    assert hyper["sagemaker_program"] == "train_job.py"
    assert hyper["sagemaker_submit_directory"].startswith("s3://bucket/jobs/recs-1/source/sourcedir.tar.gz")
    assert {k: hyper[k] for k in ("epochs", "no-ablations", "no-progress", "column")} == {
        "epochs": "30", "no-ablations": "true", "no-progress": "true", "column": "user_id=customer"}
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"] for c in request["InputDataConfig"]}
    assert channels == {
        "interactions": {"S3DataType": "S3Prefix", "S3Uri": "s3://bucket/data/inter.csv",
                         "S3DataDistributionType": "FullyReplicated"},
        "items": {"S3DataType": "S3Prefix", "S3Uri": "s3://bucket/data/items.csv",
                  "S3DataDistributionType": "FullyReplicated"},
    }
    assert request["OutputDataConfig"]["S3OutputPath"] == "s3://bucket/jobs"
    assert request["RoleArn"] == ROLE

    # The code the job runs: the entry script, both packages and the container's requirements.
    (key, body), = aws.uploaded.items()
    assert key == "jobs/recs-1/source/sourcedir.tar.gz"
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = set(tar.getnames())
        requirements = tar.extractfile("requirements.txt").read().decode()  # type: ignore[union-attr]
        entry = tar.extractfile("train_job.py").read().decode()  # type: ignore[union-attr]
    assert {"train_job.py", "training/job.py", "training/distributed.py", "twostage_rec/artifact.py"} <= names
    assert not any("__pycache__" in n for n in names)
    pins = [line.split("==")[0] for line in requirements.splitlines() if line and not line.startswith("#")]
    assert "xgboost-cpu" in pins and "torch" not in pins  # the image brings torch
    assert "from training.__main__ import job_entry" in entry


def test_a_gpu_instance_gets_the_gpu_image_and_processes_per_host(aws: Aws) -> None:
    aws.objects("bucket", "data/reviews.jsonl.gz", ["data/reviews.jsonl.gz"])
    aws.s3_upload.add_response("put_object", {})
    aws.sagemaker.add_response("create_training_job", {"TrainingJobArn": JOB_ARN})
    argv = _argv("--reviews", "s3://bucket/data/reviews.jsonl.gz", "--processes-per-host", "4", "--job-name",
                 "recs-1", count="3", instance="ml.g5.12xlarge")
    assert main(argv) == 0
    request = aws.sent["CreateTrainingJob"]
    assert "pytorch-training:2.8.0-gpu-py312" in request["AlgorithmSpecification"]["TrainingImage"]
    assert request["ResourceConfig"]["InstanceCount"] == 3
    assert json.loads(request["HyperParameters"]["sagemaker_mpi_num_of_processes_per_host"]) == "4"


def test_the_sdk_refuses_torch_distributed_on_cpu_without_an_explicit_image(aws: Aws) -> None:
    """Why build_estimator passes image_uri: SDK v2 validates torch_distributed against the
    instance family (GPU or Trainium only) when it picks the image itself."""
    from sagemaker.pytorch import PyTorch

    with pytest.raises(ValueError, match="supported only for GPU and Trainium"):
        PyTorch(entry_point="train_job.py", framework_version=launch.FRAMEWORK_VERSION, py_version=launch.PY_VERSION,
                role=ROLE, instance_type="ml.c6i.4xlarge", instance_count=2, sagemaker_session=aws.session,
                distribution={"torch_distributed": {"enabled": True}})


@pytest.mark.parametrize(
    ("keys", "size", "message"),
    [([], 100, "error: channel 'interactions' is empty: no object under s3://bucket/data/inter.csv"),
     (["data/inter.csv"], 0, "error: channel 'interactions' is empty"),
     (["data/inter.csv", "data/inter.csv.bak"], 100,
      "error: channel 'interactions': s3://bucket/data/inter.csv matches several objects")],
)
def test_an_empty_or_ambiguous_channel_stops_before_anything_is_created(
    aws: Aws, capsys: pytest.CaptureFixture[str], keys: list[str], size: int, message: str
) -> None:
    aws.objects("bucket", "data/inter.csv", keys, size=size)
    assert main(_argv("--interactions", "s3://bucket/data/inter.csv")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert aws.sent == {} and aws.uploaded == {}  # no code uploaded, no job created


@pytest.mark.parametrize(
    ("argv", "message"),
    [(_argv("--interactions", "s3://bucket/k", count="0"), "error: --instance-count 0: at least 1"),
     (_argv("--interactions", "s3://bucket/k", instance="ml.trn1.32xlarge"), "error: --instance-type ml.trn1"),
     (_argv(), "error: no data: give --interactions"),
     (_argv("--interactions", "bucket/k"), "error: channel 'interactions': 'bucket/k' is not an s3://bucket/key"),
     (_argv("--interactions", "s3://bucket/k", "--", "--interactions", "x.csv"), "error: --interactions after --"),
     (_argv("--interactions", "s3://bucket/k", "--", "--epochs", "many"), "error: run options after --: argument"),
     (_argv("--items", "s3://bucket/k"), "error: no data")],
)
def test_bad_settings_stop_with_one_line(aws: Aws, capsys: pytest.CaptureFixture[str], argv: list[str],
                                         message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err, err
    assert aws.sent == {}
