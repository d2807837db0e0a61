"""Helpers for the deployment tests: model archives with a chosen manifest, and UpdateEndpoint on moto.

moto 5.2 has no UpdateEndpoint. :class:`EndpointUpdates` answers it on one boto3 client through
botocore's ``before-call`` event, the hook ``botocore.stub.Stubber`` uses too: botocore has
checked the parameters against SageMaker's service model by then. Everything else the update
does (describe, create models and configs, tags, alarms, S3) goes to moto, so the tests see the
state the commands leave behind.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from botocore.awsrequest import AWSResponse
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sagemaker.models import sagemaker_backends

REGION = "eu-west-1"
BUCKET = "models-bucket"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/twostage-rec:abc1234"
MANIFEST = "model_manifest.json"


def manifest_tar(path: Path, ndcg: float | None = 0.3, dataset: str = "ml-1m", version: str = "v1") -> Path:
    """A model.tar.gz holding a manifest (NDCG@10 ``ndcg``, or no evaluation) between two other files."""
    extra: dict[str, Any] = {"features_as_of": 1}
    if ndcg is not None:
        extra["evaluation"] = {"ndcg@10": ndcg}
    manifest = {"model_version": version, "dataset": dataset, "extra": extra}
    with tarfile.open(path, "w:gz") as archive:
        for name, data in (("item_factors.npy", b"\x00" * 4096), (MANIFEST, json.dumps(manifest).encode()),
                           ("user_factors.npy", b"\x01" * 4096)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


class EndpointUpdates:
    """Answers UpdateEndpoint on ``client`` against moto's SageMaker state and records each request.

    ``outcome``: "complete" switches the endpoint to the new config at once; "rolled-back" leaves
    the old config and sets a FailureReason, as after an alarm; "refused" answers a
    ValidationException, as when the update cannot start.
    """

    def __init__(self, client: Any, outcome: str = "complete") -> None:
        self.outcome = outcome
        self.requests: list[dict[str, Any]] = []
        client.meta.events.register("before-call.sagemaker.UpdateEndpoint", self._answer)

    def _answer(self, model: Any, params: dict[str, Any], **kwargs: Any) -> tuple[AWSResponse, dict[str, Any]]:
        request = json.loads(params["body"])
        self.requests.append(request)
        if self.outcome == "refused":
            error = {"Code": "ValidationException", "Message": "Cannot update in-progress endpoint"}
            return AWSResponse(params["url"], 400, {}, None), {"Error": error, "ResponseMetadata": {}}
        backend = sagemaker_backends[DEFAULT_ACCOUNT_ID][REGION]
        endpoint = backend.endpoints[request["EndpointName"]]
        if self.outcome == "complete":
            config = backend.endpoint_configs[request["EndpointConfigName"]]
            endpoint.endpoint_config_name = config.endpoint_config_name
            endpoint.production_variants = endpoint._process_production_variants(config.production_variants)
        else:
            endpoint.failure_reason = "Alarm recs-AllTraffic-invocation-5xx fired; rolled back"
        return AWSResponse(params["url"], 200, {}, None), {"EndpointArn": endpoint.arn}
