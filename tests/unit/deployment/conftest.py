"""Fixtures of the deployment tests: moto's AWS with a bucket, and the clients the commands use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from tests.support.sagemaker_fakes import BUCKET, REGION
from training import deployment
from twostage_rec.artifact import pack_model_tar


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
def clients(aws: None, monkeypatch: pytest.MonkeyPatch) -> deployment.AwsClients:
    """The one set of clients every command of the test gets (so a test can hook events on them)."""
    made = deployment.AwsClients.create(REGION)
    monkeypatch.setattr(deployment.AwsClients, "create", classmethod(lambda cls, region: made))
    return made


@pytest.fixture(scope="package")
def model_tar(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return pack_model_tar(tiny_model_dir, tmp_path_factory.mktemp("tar") / "model.tar.gz")
