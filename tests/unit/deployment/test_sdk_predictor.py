"""The SageMaker Python SDK's ``Predictor`` on the real sagemaker-runtime client, stubbed with botocore's Stubber.

Local mode hands a container's 4xx body back as the answer (tests/container/test_sagemaker_local.py);
the real service raises ``ModelError`` (HTTP 424) carrying the container's status and JSON body.
"""

from __future__ import annotations

import io
import json
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.response import StreamingBody
from botocore.stub import Stubber

from local_test.sagemaker_local import SDK_CONFIG
from tests.support.sagemaker_fakes import REGION
from training.deployment import endpoint_error

ENDPOINT = "recs-1"
LOG_GROUP = f"arn:aws:logs:{REGION}:123456789012:log-group:/aws/sagemaker/Endpoints/{ENDPOINT}"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    return boto3.client("sagemaker-runtime", region_name=REGION, **CREDENTIALS)


def json_predictor(runtime: Any) -> Any:
    """A ``Predictor`` (JSON in, JSON out) whose session sends through ``runtime``."""
    import sagemaker
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import JSONSerializer

    boto_session = boto3.Session(region_name=REGION, **CREDENTIALS)
    session = sagemaker.Session(boto_session=boto_session, sagemaker_client=boto_session.client("sagemaker"),
                                sagemaker_runtime_client=runtime, sagemaker_config=SDK_CONFIG)  # fmt: skip
    return Predictor(ENDPOINT, sagemaker_session=session, serializer=JSONSerializer(), deserializer=JSONDeserializer())


def expected_call(body: dict[str, Any]) -> dict[str, Any]:
    return {"EndpointName": ENDPOINT, "Body": json.dumps(body), "ContentType": "application/json",
            "Accept": "application/json"}  # fmt: skip


def test_predict_decodes_the_answer(runtime: Any) -> None:
    answer = b'{"user_id": "alice", "recommendations": [{"item_id": "i1", "rank": 1}], "model_version": "v1"}'
    request = {"user_id": "alice", "top_k": 1}
    with Stubber(runtime) as stub:
        stub.add_response(
            "invoke_endpoint",
            {"Body": StreamingBody(io.BytesIO(answer), len(answer)), "ContentType": "application/json"},
            expected_call(request),
        )
        assert json_predictor(runtime).predict(request) == json.loads(answer)
        stub.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [(400, "bad_request", "top_k must be between 1 and 100, got 0"),
     (404, "user_not_found", "user_id 'nobody' is not in the model")],  # fmt: skip
)
def test_a_containers_4xx_raises_model_error_carrying_its_json(
    runtime: Any, status: int, error: str, message: str
) -> None:
    body = json.dumps({"error": error, "message": message, "request_id": "r-1"})
    request = {"user_id": "alice", "top_k": 0}
    with Stubber(runtime) as stub:
        # What sagemaker-runtime answers when the container says 4xx: its body quoted in the message.
        stub.add_client_error(
            "invoke_endpoint",
            service_error_code="ModelError",
            service_message=f'Received client error ({status}) from primary with message "{body}". See '
            f"https://{REGION}.console.aws.amazon.com/cloudwatch/home?region={REGION}#logEventViewer:"
            f"group=/aws/sagemaker/Endpoints/{ENDPOINT} in account 123456789012 for more information.",
            http_status_code=424,
            modeled_fields={"OriginalStatusCode": status, "OriginalMessage": body,
                            "LogStreamArn": LOG_GROUP},
            expected_params=expected_call(request),
        )  # fmt: skip
        with pytest.raises(runtime.exceptions.ModelError) as raised:
            json_predictor(runtime).predict(request)
    exc = raised.value
    assert isinstance(exc, ClientError) and exc.response["Error"]["Code"] == "ModelError"
    assert f'"error": "{error}"' in str(exc)  # the container's JSON is in the message a user sees
    assert exc.response["OriginalStatusCode"] == status
    assert json.loads(exc.response["OriginalMessage"])["error"] == error
    assert endpoint_error(exc) == f"endpoint answered {status} {error}: {message}"
