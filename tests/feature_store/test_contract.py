"""Contract tests: unmodified boto3 against the local Feature Store.

Every response is checked against botocore's output shapes before botocore parses it (unknown or
missing members, wrong types), and every error against AWS's error shape.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from local_test.feature_store.testing import FeatureStoreServer, make_clients, watch_contract

FEATURES = {"item_id": "String", "event_time": "Fractional", "price": "Fractional", "category": "String",
            "rating_count": "Integral"}
ONE_ATTEMPT = Config(retries={"mode": "standard", "total_max_attempts": 1})


@pytest.fixture(scope="module")
def feature_store() -> Iterator[FeatureStoreServer]:
    with FeatureStoreServer() as server:
        yield server


@pytest.fixture(scope="module")
def watched(feature_store: FeatureStoreServer) -> tuple[Any, Any, list[str], list[str]]:
    sagemaker, runtime = make_clients(feature_store.endpoint_url)
    return sagemaker, runtime, watch_contract(sagemaker), watch_contract(runtime)


@pytest.fixture
def clients(feature_store: FeatureStoreServer,
            watched: tuple[Any, Any, list[str], list[str]]) -> Iterator[tuple[Any, Any]]:
    """(sagemaker, runtime) clients whose every response this test must keep within botocore's model."""
    sagemaker, runtime, control_violations, runtime_violations = watched
    yield sagemaker, runtime
    feature_store.clear_faults()
    assert (control_violations, runtime_violations) == ([], [])


def create_group(sagemaker: Any, features: dict[str, str] = FEATURES, **options: Any) -> str:
    name = f"items-{uuid.uuid4().hex[:8]}"
    online = {"EnableOnlineStore": True, **options.pop("online", {})}
    sagemaker.create_feature_group(
        FeatureGroupName=name, RecordIdentifierFeatureName="item_id", EventTimeFeatureName="event_time",
        FeatureDefinitions=[{"FeatureName": n, "FeatureType": t} for n, t in features.items()],
        OnlineStoreConfig=online, **options,
    )
    return name


@pytest.fixture
def group(clients: tuple[Any, Any]) -> str:
    return create_group(clients[0])


def record(item_id: str, event_time: float | str, **features: Any) -> list[dict[str, str]]:
    values = {"item_id": item_id, "event_time": str(event_time), **{k: str(v) for k, v in features.items()}}
    return [{"FeatureName": name, "ValueAsString": value} for name, value in values.items()]


def values(response: dict[str, Any]) -> dict[str, str] | None:
    """A GetRecord response as {feature: value}, None on a miss."""
    if "Record" not in response:
        return None
    return {fv["FeatureName"]: fv["ValueAsString"] for fv in response["Record"]}


def get(runtime: Any, group: str, item_id: str, **kwargs: Any) -> dict[str, str] | None:
    return values(runtime.get_record(FeatureGroupName=group, RecordIdentifierValueAsString=item_id, **kwargs))


# -- control plane --------------------------------------------------------------------------------


def test_feature_group_lifecycle(clients: tuple[Any, Any]) -> None:
    sagemaker, _ = clients
    prefix = f"life-{uuid.uuid4().hex[:6]}"
    arns = []
    for i in range(3):
        arns.append(sagemaker.create_feature_group(
            FeatureGroupName=f"{prefix}-{i}", RecordIdentifierFeatureName="item_id", EventTimeFeatureName="event_time",
            FeatureDefinitions=[{"FeatureName": "item_id", "FeatureType": "String"},
                                {"FeatureName": "event_time", "FeatureType": "String"}],
            OnlineStoreConfig={"EnableOnlineStore": True, "TtlDuration": {"Unit": "Days", "Value": 7}},
            OfflineStoreConfig={"S3StorageConfig": {"S3Uri": "s3://bucket/prefix"}},
            Description="test group",
        )["FeatureGroupArn"])
    assert arns[0] == f"arn:aws:sagemaker:us-east-1:000000000000:feature-group/{prefix}-0"

    described = sagemaker.describe_feature_group(FeatureGroupName=arns[1])
    assert described["FeatureGroupName"] == f"{prefix}-1"
    assert described["FeatureGroupStatus"] == "Created"
    assert described["OnlineStoreConfig"]["TtlDuration"] == {"Unit": "Days", "Value": 7}
    assert described["OfflineStoreStatus"] == {"Status": "Active"}

    pages = sagemaker.get_paginator("list_feature_groups").paginate(NameContains=prefix, SortBy="Name",
                                                                    SortOrder="Ascending", MaxResults=1)
    names = [s["FeatureGroupName"] for page in pages for s in page["FeatureGroupSummaries"]]
    assert names == [f"{prefix}-{i}" for i in range(3)]

    with pytest.raises(sagemaker.exceptions.ResourceInUse):
        sagemaker.create_feature_group(FeatureGroupName=f"{prefix}-0", RecordIdentifierFeatureName="item_id",
                                       EventTimeFeatureName="event_time",
                                       FeatureDefinitions=[{"FeatureName": "item_id", "FeatureType": "String"},
                                                           {"FeatureName": "event_time", "FeatureType": "String"}],
                                       OnlineStoreConfig={"EnableOnlineStore": True})
    sagemaker.delete_feature_group(FeatureGroupName=f"{prefix}-0")
    with pytest.raises(sagemaker.exceptions.ResourceNotFound):
        sagemaker.describe_feature_group(FeatureGroupName=f"{prefix}-0")
    with pytest.raises(sagemaker.exceptions.ResourceNotFound):
        sagemaker.delete_feature_group(FeatureGroupName=f"{prefix}-0")


@pytest.mark.parametrize(("change", "expected"), [
    ({"RecordIdentifierFeatureName": "nope"}, "RecordIdentifierFeatureName"),
    ({"EventTimeFeatureName": "rating_count"}, "EventTimeFeatureName"),
    ({"FeatureGroupName": "bad name"}, "FeatureGroupName"),
    ({"FeatureDefinitions": [{"FeatureName": "item_id", "FeatureType": "String"},
                             {"FeatureName": "event_time", "FeatureType": "Fractional"},
                             {"FeatureName": "is_deleted", "FeatureType": "String"}]}, "is_deleted"),
    ({"OnlineStoreConfig": None}, "OnlineStoreConfig"),
])
def test_create_feature_group_validation(clients: tuple[Any, Any], change: dict[str, Any], expected: str) -> None:
    request: dict[str, Any] = {
        "FeatureGroupName": f"bad-{uuid.uuid4().hex[:8]}", "RecordIdentifierFeatureName": "item_id",
        "EventTimeFeatureName": "event_time", "OnlineStoreConfig": {"EnableOnlineStore": True},
        "FeatureDefinitions": [{"FeatureName": n, "FeatureType": t} for n, t in FEATURES.items()],
    }
    request.update(change)
    with pytest.raises(ClientError) as raised:
        clients[0].create_feature_group(**{k: v for k, v in request.items() if v is not None})
    assert raised.value.response["Error"]["Code"] == "ValidationException"
    assert expected in raised.value.response["Error"]["Message"]


# -- runtime ----------------------------------------------------------------------------------------


def test_put_get_feature_names_and_arn(clients: tuple[Any, Any], group: str) -> None:
    sagemaker, runtime = clients
    runtime.put_record(FeatureGroupName=group, Record=record("a", 100.5, price=9.99, category="Books", rating_count=7))
    expected = {"item_id": "a", "event_time": "100.5", "price": "9.99", "category": "Books", "rating_count": "7"}
    assert get(runtime, group, "a") == expected
    arn = sagemaker.describe_feature_group(FeatureGroupName=group)["FeatureGroupArn"]
    assert get(runtime, arn, "a", FeatureNames=["price", "rating_count"]) == {"price": "9.99", "rating_count": "7"}
    miss = runtime.get_record(FeatureGroupName=group, RecordIdentifierValueAsString="missing")
    assert set(miss) == {"ResponseMetadata"}
    with pytest.raises(runtime.exceptions.ValidationError, match="not_a_feature"):
        get(runtime, group, "a", FeatureNames=["not_a_feature"])


def test_missing_group(clients: tuple[Any, Any]) -> None:
    _, runtime = clients
    with pytest.raises(runtime.exceptions.ResourceNotFound):
        runtime.get_record(FeatureGroupName="no-such-group", RecordIdentifierValueAsString="a")
    with pytest.raises(runtime.exceptions.ValidationError, match="can't find a FeatureGroup"):
        runtime.put_record(FeatureGroupName="no-such-group", Record=record("a", 1))
    with pytest.raises(runtime.exceptions.ValidationError, match="can't find a FeatureGroup"):
        runtime.batch_get_record(
            Identifiers=[{"FeatureGroupName": "no-such-group", "RecordIdentifiersValueAsString": ["a"]}])


def test_batch_get_record(clients: tuple[Any, Any], group: str) -> None:
    sagemaker, runtime = clients
    other = create_group(sagemaker)
    for i in range(5):
        runtime.put_record(FeatureGroupName=group, Record=record(f"i{i}", 10, price=i))
    runtime.put_record(FeatureGroupName=other, Record=record("o1", 10, price=1))
    arn = sagemaker.describe_feature_group(FeatureGroupName=other)["FeatureGroupArn"]
    response = runtime.batch_get_record(Identifiers=[
        {"FeatureGroupName": group, "RecordIdentifiersValueAsString": ["i0", "i3", "nope"], "FeatureNames": ["price"]},
        {"FeatureGroupName": arn, "RecordIdentifiersValueAsString": ["o1"]},
    ])
    found = {(r["FeatureGroupName"], r["RecordIdentifierValueAsString"]): values(r) for r in response["Records"]}
    assert found == {(group, "i0"): {"price": "0"}, (group, "i3"): {"price": "3"},
                     (other, "o1"): {"item_id": "o1", "event_time": "10", "price": "1"}}
    assert response["Errors"] == [] and response["UnprocessedIdentifiers"] == []


@pytest.mark.parametrize("split", [[101], [60, 41]])
def test_batch_get_record_caps_100_ids(clients: tuple[Any, Any], group: str, split: list[int]) -> None:
    identifiers = [{"FeatureGroupName": group, "RecordIdentifiersValueAsString": [f"{k}-{i}" for i in range(n)]}
                   for k, n in enumerate(split)]
    with pytest.raises(clients[1].exceptions.ValidationError, match="101 record identifiers"):
        clients[1].batch_get_record(Identifiers=identifiers)


@pytest.mark.parametrize(("bad_record", "expected"), [
    (record("a", 1, rating_count="1.5"), "Integral"),
    (record("a", 1, price="cheap"), "Fractional"),
    (record("a", 1, colour="red"), "colour"),
    (record("a", "2024-01-01T00:00:00Z"), "event_time"),
    ([{"FeatureName": "event_time", "ValueAsString": "1"}], "item_id"),
    ([{"FeatureName": "item_id", "ValueAsString": "a"}], "event_time"),
    (record("a", 1) + [{"FeatureName": "item_id", "ValueAsString": "b"}], "more than once"),
])
def test_put_record_validation(clients: tuple[Any, Any], group: str, bad_record: list[dict[str, str]],
                               expected: str) -> None:
    with pytest.raises(clients[1].exceptions.ValidationError, match=expected):
        clients[1].put_record(FeatureGroupName=group, Record=bad_record)


def test_event_time_ordering(clients: tuple[Any, Any], group: str) -> None:
    _, runtime = clients
    for event_time, price in [(100, 1), (50, 2), (100, 3), (99.9, 4)]:
        runtime.put_record(FeatureGroupName=group, Record=record("a", event_time, price=price))
    assert get(runtime, group, "a")["price"] == "1"  # only a strictly greater EventTime replaces the record
    runtime.put_record(FeatureGroupName=group, Record=record("a", 200, price=5))
    assert get(runtime, group, "a")["price"] == "5"


def test_iso_event_times(clients: tuple[Any, Any]) -> None:
    sagemaker, runtime = clients
    group = create_group(sagemaker, {"item_id": "String", "event_time": "String", "price": "Fractional"})
    runtime.put_record(FeatureGroupName=group, Record=record("a", "2024-05-01T10:00:00.500Z", price=1))
    runtime.put_record(FeatureGroupName=group, Record=record("a", "2024-05-01T10:00:00Z", price=2))
    assert get(runtime, group, "a")["price"] == "1"
    with pytest.raises(runtime.exceptions.ValidationError, match="yyyy-MM-dd"):
        runtime.put_record(FeatureGroupName=group, Record=record("a", 1714557600))


def test_ttl_expiry(clients: tuple[Any, Any]) -> None:
    sagemaker, runtime = clients
    group = create_group(sagemaker, online={"TtlDuration": {"Unit": "Hours", "Value": 1}})
    now = time.time()
    runtime.put_record(FeatureGroupName=group, Record=record("old", now - 7200))  # group TTL: expired an hour ago
    runtime.put_record(FeatureGroupName=group, Record=record("kept", now - 7200),
                       TtlDuration={"Unit": "Days", "Value": 1})
    runtime.put_record(FeatureGroupName=group, Record=record("fresh", now))
    assert get(runtime, group, "old") is None
    assert get(runtime, group, "kept") is not None
    response = runtime.get_record(FeatureGroupName=group, RecordIdentifierValueAsString="fresh",
                                  ExpirationTimeResponse="Enabled")
    expires_at = time.mktime(time.strptime(response["ExpiresAt"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert abs(expires_at - (now + 3600)) < 2
    assert "ExpiresAt" not in runtime.get_record(FeatureGroupName=group, RecordIdentifierValueAsString="fresh")
    batch = runtime.batch_get_record(ExpirationTimeResponse="Enabled", Identifiers=[
        {"FeatureGroupName": group, "RecordIdentifiersValueAsString": ["old", "kept", "fresh"]}])
    assert {r["RecordIdentifierValueAsString"] for r in batch["Records"]} == {"kept", "fresh"}
    assert all("ExpiresAt" in r for r in batch["Records"])
    # An expired record no longer blocks an older EventTime.
    runtime.put_record(FeatureGroupName=group, Record=record("old", now - 7300, price=1),
                       TtlDuration={"Unit": "Weeks", "Value": 1})
    assert get(runtime, group, "old")["price"] == "1"


def test_soft_and_hard_delete(clients: tuple[Any, Any], group: str) -> None:
    _, runtime = clients
    for item_id in ("soft", "hard"):
        runtime.put_record(FeatureGroupName=group, Record=record(item_id, 100, price=1))

    runtime.delete_record(FeatureGroupName=group, RecordIdentifierValueAsString="soft", EventTime="50")
    assert get(runtime, group, "soft") is not None  # an older SoftDelete is ignored
    runtime.delete_record(FeatureGroupName=group, RecordIdentifierValueAsString="soft", EventTime="150")
    assert get(runtime, group, "soft") is None
    runtime.put_record(FeatureGroupName=group, Record=record("soft", 120, price=2))
    assert get(runtime, group, "soft") is None  # the tombstone's EventTime (150) still wins
    runtime.put_record(FeatureGroupName=group, Record=record("soft", 160, price=3))
    assert get(runtime, group, "soft")["price"] == "3"

    with pytest.raises(runtime.exceptions.ValidationError, match="older"):
        runtime.delete_record(FeatureGroupName=group, RecordIdentifierValueAsString="hard", EventTime="50",
                              DeletionMode="HardDelete")
    runtime.delete_record(FeatureGroupName=group, RecordIdentifierValueAsString="hard",
                          EventTime="2030-01-01T00:00:00Z", DeletionMode="HardDelete")
    assert get(runtime, group, "hard") is None
    runtime.put_record(FeatureGroupName=group, Record=record("hard", 1, price=4))
    assert get(runtime, group, "hard")["price"] == "4"  # nothing is left to compare against


def test_target_stores(clients: tuple[Any, Any], group: str) -> None:
    _, runtime = clients
    runtime.put_record(FeatureGroupName=group, Record=record("off", 1), TargetStores=["OfflineStore"])
    assert get(runtime, group, "off") is None
    runtime.put_record(FeatureGroupName=group, Record=record("on", 1), TargetStores=["OnlineStore", "OfflineStore"])
    assert get(runtime, group, "on") is not None


def test_endpoint_from_environment(feature_store: FeatureStoreServer, group: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_FEATURESTORE_RUNTIME", feature_store.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER", feature_store.endpoint_url)
    session = boto3.session.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="eu-west-1")
    assert session.client("sagemaker").describe_feature_group(FeatureGroupName=group)["FeatureGroupName"] == group
    miss = session.client("sagemaker-featurestore-runtime").get_record(FeatureGroupName=group,
                                                                       RecordIdentifierValueAsString="none")
    assert "Record" not in miss


# -- wire details -----------------------------------------------------------------------------------


def test_access_forbidden_without_signature_and_keep_alive(feature_store: FeatureStoreServer, group: str) -> None:
    url = urlsplit(feature_store.endpoint_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    body = json.dumps({"Record": record("x", 1)})
    connection.request("PUT", f"/FeatureGroup/{group}", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 403
    assert response.getheader("x-amzn-ErrorType") == "AccessForbidden"
    assert "message" in json.loads(response.read())
    # The same connection still works: the unsigned request's body was consumed.
    signed = {"Authorization": "AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/sagemaker/aws4_request"}
    connection.request("GET", f"/FeatureGroup/{group}?RecordIdentifierValueAsString=x", headers=signed)
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {}
    assert response.getheader("Connection") != "close"
    connection.close()


def test_throttling_surfaces_after_retries(feature_store: FeatureStoreServer, clients: tuple[Any, Any],
                                           group: str) -> None:
    feature_store.set_faults(throttle_rate=1.0)
    feature_store.reset_stats()
    _, runtime = make_clients(feature_store.endpoint_url, config=ONE_ATTEMPT)
    with pytest.raises(ClientError) as raised:
        runtime.batch_get_record(Identifiers=[{"FeatureGroupName": group, "RecordIdentifiersValueAsString": ["a"]}])
    assert raised.value.response["Error"]["Code"] == "ThrottlingException"
    _, retrying = make_clients(feature_store.endpoint_url, config=Config(
        retries={"mode": "standard", "total_max_attempts": 2}))
    with pytest.raises(ClientError, match="ThrottlingException"):
        retrying.get_record(FeatureGroupName=group, RecordIdentifierValueAsString="a")
    assert feature_store.stats() == {"BatchGetRecord": 1, "GetRecord": 2}  # botocore retried once
    clients[0].describe_feature_group(FeatureGroupName=group)  # the control plane is never faulted


def test_server_errors(feature_store: FeatureStoreServer, clients: tuple[Any, Any], group: str) -> None:
    feature_store.set_faults(error_rate=1.0, seed=3)
    _, runtime = make_clients(feature_store.endpoint_url, config=ONE_ATTEMPT)
    codes = set()
    for _ in range(12):
        with pytest.raises((runtime.exceptions.InternalFailure, runtime.exceptions.ServiceUnavailable)) as raised:
            runtime.get_record(FeatureGroupName=group, RecordIdentifierValueAsString="a")
        codes.add((raised.value.response["Error"]["Code"], raised.value.response["ResponseMetadata"]["HTTPStatusCode"]))
    assert codes == {("InternalFailure", 500), ("ServiceUnavailable", 503)}


def test_partial_batch_faults(feature_store: FeatureStoreServer, clients: tuple[Any, Any], group: str) -> None:
    _, runtime = clients
    ids = [f"p{i}" for i in range(100)]
    for item_id in ids:
        runtime.put_record(FeatureGroupName=group, Record=record(item_id, 1, price=2))
    feature_store.set_faults(unprocessed_rate=0.3, record_error_rate=0.2, seed=1)
    request = [{"FeatureGroupName": group, "RecordIdentifiersValueAsString": ids, "FeatureNames": ["price"]}]
    response = runtime.batch_get_record(Identifiers=request)
    served = [r["RecordIdentifierValueAsString"] for r in response["Records"]]
    errored = [e["RecordIdentifierValueAsString"] for e in response["Errors"]]
    [unprocessed] = response["UnprocessedIdentifiers"]
    assert unprocessed["FeatureNames"] == ["price"] and unprocessed["FeatureGroupName"] == group
    skipped = unprocessed["RecordIdentifiersValueAsString"]
    assert sorted(served + errored + skipped) == sorted(ids)
    assert served and errored and skipped
    assert {e["ErrorCode"] for e in response["Errors"]} == {"InternalFailure"}
    feature_store.clear_faults()
    retried = runtime.batch_get_record(Identifiers=response["UnprocessedIdentifiers"])
    assert sorted(r["RecordIdentifierValueAsString"] for r in retried["Records"]) == sorted(skipped)


def test_fault_settings_over_http(feature_store: FeatureStoreServer) -> None:
    assert feature_store.set_faults(latency_ms=5, seed=2)["latency_ms"] == 5
    assert feature_store.clear_faults()["latency_ms"] == 0
    with pytest.raises(ValueError, match="throttle_rate"):
        feature_store.set_faults(throttle_rate=2)
    with pytest.raises(ValueError, match="unknown fault setting"):
        feature_store.set_faults(trottle_rate=0.5)
