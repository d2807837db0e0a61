"""In-process units of the local Feature Store: fault settings, event times, the shape checker."""

from __future__ import annotations

import botocore.session
import pytest

from local_test.feature_store.faults import FaultConfig, FaultInjector
from local_test.feature_store.store import ApiError, format_expires_at, parse_event_time
from local_test.feature_store.testing import shape_errors


@pytest.mark.parametrize(("settings", "message"), [
    ({"error_rate": -0.1}, "error_rate"),
    ({"unprocessed_rate": "0.5"}, "unprocessed_rate"),
    ({"latency_ms": -1}, "latency_ms"),
    ({"seed": 1.5}, "seed"),
    ({"throttle": 0.5}, "unknown fault setting"),
])
def test_fault_config_rejects_bad_settings(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultConfig.from_mapping(settings)


def test_seeded_faults_repeat() -> None:
    config = FaultConfig.from_mapping({"unprocessed_rate": 0.3, "record_error_rate": 0.3, "seed": 42})
    ids = [str(i) for i in range(100)]
    first, second = FaultInjector(config).split_batch(ids), FaultInjector(config).split_batch(ids)
    assert first == second
    assert all(first) and sorted(sum(first, [])) == sorted(ids)
    assert FaultInjector().split_batch(ids) == (ids, [], [])


def test_throttle_and_error_faults() -> None:
    with pytest.raises(ApiError) as raised:
        FaultInjector(FaultConfig(throttle_rate=1.0)).before_request()
    assert (raised.value.code, raised.value.status) == ("ThrottlingException", 400)
    injector = FaultInjector(FaultConfig(error_rate=1.0, seed=0))
    statuses = set()
    for _ in range(20):
        with pytest.raises(ApiError) as raised:
            injector.before_request()
        statuses.add(raised.value.status)
    assert statuses == {500, 503}
    FaultInjector().before_request()  # no faults configured: nothing raised


@pytest.mark.parametrize(("value", "feature_type", "expected"), [
    ("1700000000.25", "Fractional", 1700000000.25),
    ("2023-11-14T22:13:20Z", "String", 1700000000.0),
    ("2023-11-14T22:13:20.250Z", "String", 1700000000.25),
    ("2023-11-14T22:13:20Z", None, 1700000000.0),
    ("1700000000", None, 1700000000.0),
])
def test_parse_event_time(value: str, feature_type: str | None, expected: float) -> None:
    assert parse_event_time(value, feature_type) == pytest.approx(expected)


@pytest.mark.parametrize(("value", "feature_type"), [
    ("2023-11-14 22:13:20", "String"), ("2023-11-14T22:13:20+00:00", "String"), ("1700000000", "String"),
    ("2023-11-14T22:13:20Z", "Fractional"), ("nan", "Fractional"), ("soon", None),
])
def test_parse_event_time_rejects(value: str, feature_type: str | None) -> None:
    with pytest.raises(ApiError, match="EventTime"):
        parse_event_time(value, feature_type)


def test_format_expires_at() -> None:
    assert format_expires_at(1700000000.25) == "2023-11-14T22:13:20.250Z"


def test_shape_errors_catches_contract_breaks() -> None:
    model = botocore.session.get_session().get_service_model("sagemaker-featurestore-runtime")
    shape = model.operation_model("BatchGetRecord").output_shape
    good = {"Records": [{"FeatureGroupName": "g", "RecordIdentifierValueAsString": "a",
                         "Record": [{"FeatureName": "f", "ValueAsString": "1"}]}],
            "Errors": [], "UnprocessedIdentifiers": []}
    assert shape_errors(shape, good) == []
    bad = {"Records": [{"FeatureGroupName": "g", "Record": [{"FeatureName": "f", "ValueAsString": 1}], "Extra": 1}],
           "Errors": {}}
    assert sorted(shape_errors(shape, bad)) == sorted([
        "$.UnprocessedIdentifiers: required member missing",
        "$.Records[0].RecordIdentifierValueAsString: required member missing",
        "$.Records[0].Record[0].ValueAsString: expected string, got int 1",
        "$.Records[0].Extra: not a member of BatchGetRecordResultDetail",
        "$.Errors: expected a list, got dict",
    ])
