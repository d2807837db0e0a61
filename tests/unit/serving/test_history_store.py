"""User histories: the record codec, merging, and the Feature Store reader against a Stubber."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any

import boto3
import numpy as np
import pytest
from botocore.stub import Stubber

from twostage_rec.artifact import UserHistorySchema
from twostage_rec.circuit_breaker import CircuitBreaker
from twostage_rec.errors import FeatureSourceUnavailable
from twostage_rec.features import RuntimeResources
from twostage_rec.history_store import (
    FeatureStoreHistorySource,
    HistoryBatch,
    HistoryEvent,
    MalformedHistoryRecord,
    artifact_user_history,
    decode_history_record,
    decode_record_version,
    encode_history_record,
    make_history_source,
    merge_events,
)
from twostage_rec.settings import Settings, SettingsError

GROUP = "tiny-user-history"
SCHEMA = UserHistorySchema(GROUP)
NAMES = ["item_ids", "timestamps"]
E = HistoryEvent


def fields(item_ids: str, timestamps: str) -> list[dict[str, str]]:
    return [{"FeatureName": "item_ids", "ValueAsString": item_ids},
            {"FeatureName": "timestamps", "ValueAsString": timestamps}]


# -- codec and merging ------------------------------------------------------------------------


def test_codec_round_trip_and_version() -> None:
    events = [E("i1", 100), E("ünï", 100), E('quo"te', 200)]
    record = encode_history_record(SCHEMA, "alice", events, 7)
    by_name = {f["FeatureName"]: f["ValueAsString"] for f in record}
    assert by_name["user_id"] == "alice" and by_name["event_time"] == "7"
    assert by_name["timestamps"] == "[100,100,200]"
    assert decode_history_record(SCHEMA, record) == events
    assert decode_record_version(SCHEMA, record) == 7
    assert decode_history_record(SCHEMA, encode_history_record(SCHEMA, "bob", [], 1)) == []


@pytest.mark.parametrize(("value", "version"), [("12", 12), ("12.999", 12), ("1700000000.5", 1700000000),
                                                ("5.000000000000001", 5), ("1e3", 1000)])
def test_record_version_is_floored_exactly(value: str, version: int) -> None:
    assert decode_record_version(SCHEMA, [{"FeatureName": "event_time", "ValueAsString": value}]) == version


@pytest.mark.parametrize(("record", "message"), [
    (fields("not json", "[1]"), "item_ids is not JSON"),
    (fields('{"a": 1}', "[1]"), "not a list"),
    (fields('["a", "b"]', "[1]"), "2 values but timestamps has 1"),
    (fields("[1]", "[1]"), "not a non-empty string"),
    (fields('[""]', "[1]"), "not a non-empty string"),
    (fields('["a"]', "[1.5]"), "not an integer"),
    (fields('["a"]', '["1"]'), "not an integer"),
    (fields('["a"]', "[true]"), "not an integer"),
    (fields('["a"]', f"[{2**70}]"), "not an integer"),
    (fields('["a"]', "[" + "9" * 5000 + "]"), "not JSON"),
    (fields('["a"]', "[1]")[:1], "timestamps is missing"),
    ([{"FeatureName": "item_ids", "ValueAsStringList": ["a"]}, fields("[]", "[]")[1]], "item_ids is missing"),
    ("a string", "not a list of FeatureValues"),
])
def test_decode_rejects_malformed_records(record: Any, message: str) -> None:
    with pytest.raises(MalformedHistoryRecord, match=message) as raised:
        decode_history_record(SCHEMA, record)
    assert "\n" not in str(raised.value)


def test_decode_version_rejects_non_numbers() -> None:
    with pytest.raises(MalformedHistoryRecord, match="event_time"):
        decode_record_version(SCHEMA, [{"FeatureName": "event_time", "ValueAsString": "yesterday"}])


def test_merge_dedupes_sorts_stably_and_keeps_the_last() -> None:
    stored = [E("a", 1), E("b", 5), E("c", 5)]
    fresh = [E("d", 5), E("b", 5), E("e", 3), E("a", 9)]
    assert merge_events(stored, fresh, max_length=10) == [
        E("a", 1), E("e", 3), E("b", 5), E("c", 5), E("d", 5), E("a", 9)]  # ties keep first-seen order
    assert merge_events(stored, fresh, max_length=2) == [E("d", 5), E("a", 9)]
    assert merge_events([], max_length=3) == []
    assert merge_events(stored, max_length=0) == []


def test_artifact_adapter_reads_the_last_history_length_of_the_seen_arrays() -> None:
    artifact = SimpleNamespace(
        item_ids=["i0", "i1", "i2"],
        manifest=SimpleNamespace(history_length=2),
        seen_indptr=np.array([0, 3, 3, 4], dtype=np.int64),
        seen_indices=np.array([1, 2, 0, 1], dtype=np.int32),
        seen_timestamps=np.array([5, 10, 20, 30], dtype=np.int64),
    )
    assert artifact_user_history(artifact, 0) == [E("i2", 10), E("i0", 20)]  # type: ignore[arg-type]
    assert artifact_user_history(artifact, 1) == []  # type: ignore[arg-type]
    assert artifact_user_history(artifact, 2) == [E("i1", 30)]  # type: ignore[arg-type]


# -- settings ---------------------------------------------------------------------------------


def test_settings_read_the_history_group_and_breaker() -> None:
    default = Settings.from_env({})
    assert default.user_history_feature_group_name is None
    assert (default.breaker_failures, default.breaker_open_s) == (5, 5.0)
    # The history group needs no item group: item features may stay embedded.
    s = Settings.from_env({"USER_HISTORY_FEATURE_GROUP_NAME": GROUP, "FEATURE_STORE_BREAKER_FAILURES": "2",
                           "FEATURE_STORE_BREAKER_OPEN_S": "0.5"})
    assert (s.feature_source, s.user_history_feature_group_name) == ("embedded", GROUP)
    assert (s.breaker_failures, s.breaker_open_s) == (2, 0.5)


@pytest.mark.parametrize(("name", "value"), [("FEATURE_STORE_BREAKER_FAILURES", "0"),
                                             ("FEATURE_STORE_BREAKER_FAILURES", "many"),
                                             ("FEATURE_STORE_BREAKER_OPEN_S", "-1"),
                                             ("FEATURE_STORE_BREAKER_OPEN_S", "soon")])
def test_settings_reject_bad_breaker_values(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_make_history_source_uses_the_environment_name_and_manifest_layout() -> None:
    manifest = SimpleNamespace(user_history=UserHistorySchema("trained-name", item_ids_feature_name="items"))
    assert make_history_source(manifest, Settings()) is None  # type: ignore[arg-type]
    settings = Settings(user_history_feature_group_name="env-name")
    source = make_history_source(manifest, settings)  # type: ignore[arg-type]
    assert source is not None
    assert source.schema == UserHistorySchema("env-name", item_ids_feature_name="items")
    bare = make_history_source(SimpleNamespace(user_history=None), settings)  # type: ignore[arg-type]
    assert bare is not None and bare.schema == UserHistorySchema("env-name")


# -- the reader -------------------------------------------------------------------------------


def stubbed(strict: bool = False, breaker: CircuitBreaker | None = None) -> tuple[FeatureStoreHistorySource, Stubber]:
    settings = Settings(region="us-east-1", feature_store_strict=strict, feature_store_parallelism=1,
                        user_history_feature_group_name=GROUP)
    client = boto3.client("sagemaker-featurestore-runtime", region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="y")
    runtime = RuntimeResources(settings, client_factory=lambda _settings: client)
    return FeatureStoreHistorySource(SCHEMA, settings, breaker=breaker, runtime=runtime), Stubber(client)


def asked(ids: list[str]) -> dict:
    return {"Identifiers": [{"FeatureGroupName": GROUP, "RecordIdentifiersValueAsString": ids, "FeatureNames": NAMES}]}


def answer(records: dict[str, list[dict[str, str]]], unprocessed: list[str] = ()) -> dict:
    return {
        "Records": [{"FeatureGroupName": GROUP, "RecordIdentifierValueAsString": user, "Record": record}
                    for user, record in records.items()],
        "Errors": [],
        "UnprocessedIdentifiers": (
            [{"FeatureGroupName": GROUP, "RecordIdentifiersValueAsString": list(unprocessed)}] if unprocessed else []),
    }


def far() -> float:
    return time.monotonic() + 30


def test_one_call_for_the_batch_and_missing_users_are_absent() -> None:
    source, stub = stubbed()
    stub.add_response("batch_get_record", answer({"alice": fields('["i1","i2"]', "[10,20]")}),
                      asked(["alice", "bob", "carol"]))
    with stub:
        batch = source.get(["alice", "bob", "carol", "alice"], far())
    stub.assert_no_pending_responses()
    assert batch.degraded is False
    assert batch.events == {"alice": [E("i1", 10), E("i2", 20)]}


def test_more_than_100_users_are_read_in_chunks() -> None:
    users = [f"u{i}" for i in range(150)]
    source, stub = stubbed()
    stub.add_response("batch_get_record", answer({"u0": fields('["a"]', "[1]")}), asked(users[:100]))
    stub.add_response("batch_get_record", answer({"u149": fields('["b"]', "[2]")}), asked(users[100:]))
    with stub:
        batch = source.get(users, far())
    stub.assert_no_pending_responses()
    assert batch.events == {"u0": [E("a", 1)], "u149": [E("b", 2)]} and not batch.degraded


def test_unprocessed_users_are_retried_once_then_degrade() -> None:
    source, stub = stubbed()
    stub.add_response("batch_get_record", answer({}, unprocessed=["bob"]), asked(["bob"]))
    stub.add_response("batch_get_record", answer({"bob": fields('["x"]', "[3]")}), asked(["bob"]))
    with stub:
        assert source.get(["bob"], far()).events == {"bob": [E("x", 3)]}
    source, stub = stubbed()
    stub.add_response("batch_get_record", answer({"alice": fields("[]", "[]")}, unprocessed=["bob"]),
                      asked(["alice", "bob"]))
    stub.add_response("batch_get_record", answer({}, unprocessed=["bob"]), asked(["bob"]))
    with stub:
        batch = source.get(["alice", "bob"], far())
    assert batch.degraded is True and batch.events == {"alice": []}  # what was read is kept


def test_malformed_record_is_ignored_with_one_warning_even_when_strict(caplog: pytest.LogCaptureFixture) -> None:
    for strict in (False, True):
        caplog.clear()
        source, stub = stubbed(strict=strict)
        stub.add_response("batch_get_record", answer({"alice": fields('["i1"]', "[10]"),
                                                      "mallory": fields('["i1", "i2"]', "[10]")}),
                          asked(["alice", "mallory"]))
        with stub, caplog.at_level(logging.WARNING, logger="twostage_rec.history_store"):
            batch = source.get(["alice", "mallory"], far())
        assert batch.degraded is True and batch.events == {"alice": [E("i1", 10)]}
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "'mallory'" in warnings[0]


def test_failed_read_degrades_or_raises_when_strict() -> None:
    source, stub = stubbed()
    stub.add_client_error("batch_get_record", "ThrottlingException", "slow down", 400)
    with stub:
        batch = source.get(["alice"], far())
    assert batch.degraded is True and batch.events == {}
    strict, stub = stubbed(strict=True)
    stub.add_client_error("batch_get_record", "ServiceUnavailable", "down", 503)
    with stub, pytest.raises(FeatureSourceUnavailable) as raised:
        strict.get(["alice"], far())
    assert int(raised.value.status) == 503


def test_open_breaker_makes_no_call() -> None:
    now = [0.0]
    breaker = CircuitBreaker("history", 2, 5.0, clock=lambda: now[0])
    source, stub = stubbed(breaker=breaker)
    for _ in range(2):
        stub.add_client_error("batch_get_record", "ServiceUnavailable", "down", 503)
    stub.add_response("batch_get_record", answer({"alice": fields('["i1"]', "[10]")}), asked(["alice"]))
    with stub:
        for _ in range(2):
            assert source.get(["alice"], far()).degraded is True
        for _ in range(5):  # open: answered at once, no call (Stubber would fail on an extra one)
            assert source.get(["alice"], far()) == HistoryBatch({}, degraded=True)
        now[0] += 5.0
        probe = source.get(["alice"], far())  # the one probe
    stub.assert_no_pending_responses()
    assert probe.degraded is False and breaker.state == "closed"
    strict_breaker = CircuitBreaker("history", 1, 5.0, clock=lambda: 0.0)
    strict, _ = stubbed(strict=True, breaker=strict_breaker)
    strict_breaker.record_failure()
    with pytest.raises(FeatureSourceUnavailable, match="circuit breaker open"):
        strict.get(["alice"], far())


def test_deadline_in_the_past_degrades() -> None:
    source, stub = stubbed()
    with stub:
        batch = source.get(["alice"], time.monotonic() - 1)
    assert batch.degraded is True and batch.events == {}


def test_no_users_no_call() -> None:
    source, stub = stubbed()
    with stub:
        assert source.get([], far()).events == {}
