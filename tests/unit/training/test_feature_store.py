"""Feature group creation against botocore's Stubber: what is asked of SageMaker, and when it waits."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import ANY, Stubber

from training import feature_store


def _client() -> object:
    return boto3.session.Session().client(
        "sagemaker", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x"
    )


def _create(sagemaker: object) -> str:
    return feature_store.create_feature_group(
        sagemaker, "items", "item_id", "event_time", [{"FeatureName": "item_id", "FeatureType": "String"}], "test"
    )


@pytest.mark.parametrize("statuses", [["Created"], ["Creating", "Creating", "Created"]])
def test_a_new_group_is_described_at_once_and_polled_only_while_creating(
    statuses: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sagemaker = _client()
    sleeps: list[float] = []
    monkeypatch.setattr(feature_store.time, "sleep", sleeps.append)
    with Stubber(sagemaker) as stub:
        stub.add_client_error("describe_feature_group", "ResourceNotFound", http_status_code=404)
        stub.add_response("create_feature_group", {"FeatureGroupArn": "arn:aws:sagemaker:eu-west-1:1:feature-group/items"},
                          {"FeatureGroupName": "items", "RecordIdentifierFeatureName": "item_id",
                           "EventTimeFeatureName": "event_time", "FeatureDefinitions": ANY,
                           "OnlineStoreConfig": {"EnableOnlineStore": True}, "Description": "test"})
        for status in statuses:
            stub.add_response("describe_feature_group", _described(status), {"FeatureGroupName": "items"})
        assert _create(sagemaker) == "items"
        stub.assert_no_pending_responses()
    assert sleeps == [2] * (len(statuses) - 1)  # no wait before the first answer


def test_a_group_that_fails_to_create_stops_with_its_status(monkeypatch: pytest.MonkeyPatch) -> None:
    sagemaker = _client()
    monkeypatch.setattr(feature_store.time, "sleep", lambda s: None)
    with Stubber(sagemaker) as stub:
        stub.add_response("describe_feature_group", _described("CreateFailed"), {"FeatureGroupName": "items"})
        with pytest.raises(RuntimeError, match="items is CreateFailed, not Created"):
            _create(sagemaker)


def _described(status: str) -> dict[str, object]:
    return {
        "FeatureGroupArn": "arn:aws:sagemaker:eu-west-1:1:feature-group/items",
        "FeatureGroupName": "items",
        "RecordIdentifierFeatureName": "item_id",
        "EventTimeFeatureName": "event_time",
        "FeatureDefinitions": [{"FeatureName": "item_id", "FeatureType": "String"}],
        "CreationTime": "2026-01-01T00:00:00Z",
        "FeatureGroupStatus": status,
        "NextToken": "",
    }
