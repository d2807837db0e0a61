"""Feature sources: Stubber tests of the Feature Store source, and the cache."""

from __future__ import annotations

import time
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.stub import Stubber

from twostage_rec import schema
from twostage_rec.artifact import ModelArtifact, load_artifact
from twostage_rec.circuit_breaker import CircuitBreaker
from twostage_rec.errors import FeatureSourceUnavailable
from twostage_rec.features import CachedFeatureSource, EmbeddedFeatureSource, FeatureStoreSource, RuntimeResources
from twostage_rec.recommender import TwoStageRecommender
from twostage_rec.settings import Settings

NAMES = [schema.ITEM_AVG_RATING, schema.ITEM_RATING_COUNT, schema.CATEGORY, schema.PRICE]


def record(item_id: str, avg: str = "4.5", count: str = "7", category: str = "odd", price: str = "12.5") -> dict:
    values = dict(zip(NAMES, [avg, count, category, price]))
    return {
        "FeatureGroupName": "tiny-items",
        "RecordIdentifierValueAsString": item_id,
        "Record": [{"FeatureName": k, "ValueAsString": v} for k, v in values.items()],
    }


def request_for(ids: list[str]) -> dict:
    return {
        "Identifiers": [
            {"FeatureGroupName": "tiny-items", "RecordIdentifiersValueAsString": ids, "FeatureNames": NAMES}
        ]
    }


def response(records: list[dict], unprocessed: list[str] = (), errors: list[str] = ()) -> dict:
    return {
        "Records": records,
        "Errors": [
            {"FeatureGroupName": "tiny-items", "RecordIdentifierValueAsString": e, "ErrorCode": "X", "ErrorMessage": "m"}
            for e in errors
        ],
        "UnprocessedIdentifiers": (
            [{"FeatureGroupName": "tiny-items", "RecordIdentifiersValueAsString": list(unprocessed)}] if unprocessed else []
        ),
    }


@pytest.fixture
def artifact(tiny_model_dir: Path) -> ModelArtifact:
    return load_artifact(tiny_model_dir)


def stubbed_source(artifact: ModelArtifact, strict: bool = False) -> tuple[FeatureStoreSource, Stubber]:
    settings = Settings(feature_source="featurestore", feature_group_name="tiny-items", region="us-east-1",
                        feature_store_strict=strict, feature_store_parallelism=1)
    client = boto3.client("sagemaker-featurestore-runtime", region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="y")
    runtime = RuntimeResources(settings, client_factory=lambda _settings: client)
    source = FeatureStoreSource(artifact, settings, fallback=EmbeddedFeatureSource(artifact), runtime=runtime)
    return source, Stubber(client)


def far() -> float:
    return time.monotonic() + 30


def test_parses_values_maps_category_and_missing_records_are_nan(artifact: ModelArtifact) -> None:
    source, stub = stubbed_source(artifact)
    stub.add_response("batch_get_record", response([record("i1")]), request_for(["i1", "i2"]))
    with stub:
        batch = source.get(np.array([1, 2]), far())
    assert batch.degraded is False
    np.testing.assert_allclose(batch.values[0], [4.5, 7.0, 1.0, 12.5])  # "odd" -> code 1
    assert np.isnan(batch.values[1]).all()


def test_chunks_at_100_ids(artifact: ModelArtifact) -> None:
    big_ids = [f"x{i}" for i in range(250)]
    source, stub = stubbed_source(artifact)
    source._item_ids = big_ids
    for lo in (0, 100, 200):
        chunk = big_ids[lo : min(lo + 100, 250)]
        stub.add_response("batch_get_record", response([record(chunk[0])]), request_for(chunk))
    with stub:
        batch = source.get(np.arange(250), far())
    stub.assert_no_pending_responses()
    assert batch.values.shape == (250, 4)
    assert np.isfinite(batch.values[[0, 100, 200]]).all() and np.isnan(batch.values[1]).all()


def test_unprocessed_identifiers_are_retried_once(artifact: ModelArtifact) -> None:
    source, stub = stubbed_source(artifact)
    stub.add_response("batch_get_record", response([record("i1")], unprocessed=["i2"]), request_for(["i1", "i2"]))
    stub.add_response("batch_get_record", response([record("i2", avg="3.0")]), request_for(["i2"]))
    with stub:
        batch = source.get(np.array([1, 2]), far())
    assert batch.degraded is False and batch.values[1, 0] == 3.0


def test_still_unprocessed_after_retry_falls_back_to_snapshot(artifact: ModelArtifact) -> None:
    source, stub = stubbed_source(artifact)
    stub.add_response("batch_get_record", response([], unprocessed=["i2"]), request_for(["i2"]))
    stub.add_response("batch_get_record", response([], errors=["i2"]), request_for(["i2"]))
    with stub:
        batch = source.get(np.array([2]), far())
    assert batch.degraded is True
    np.testing.assert_allclose(batch.values[0], artifact.item_features[2])


def test_throttling_degrades_or_503_when_strict(artifact: ModelArtifact) -> None:
    source, stub = stubbed_source(artifact)
    stub.add_client_error("batch_get_record", "ThrottlingException", "slow down", 400)
    with stub:
        batch = source.get(np.array([3]), far())
    assert batch.degraded is True
    strict, stub2 = stubbed_source(artifact, strict=True)
    stub2.add_client_error("batch_get_record", "ServiceUnavailable", "down", 503)
    with stub2, pytest.raises(FeatureSourceUnavailable):
        strict.get(np.array([3]), far())


class CountingSource:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def get(self, item_idx: np.ndarray, deadline: float):
        from twostage_rec.features import FeatureBatch

        self.calls.append(item_idx.tolist())
        return FeatureBatch(np.tile(item_idx[:, None].astype(np.float32), (1, 2)))


def test_cache_ttl_and_size_bound() -> None:
    now = [0.0]
    inner = CountingSource()
    cache = CachedFeatureSource(inner, width=2, ttl_s=10, max_items=3, clock=lambda: now[0])
    np.testing.assert_array_equal(cache.get(np.array([1, 2]), far()).values[:, 0], [1, 2])
    cache.get(np.array([2, 1]), far())
    assert inner.calls == [[1, 2]]  # second call fully cached
    cache.get(np.array([3, 4]), far())  # 4 rows for 3 slots: the least recently used (2) goes
    assert sorted(cache._rows) == [1, 3, 4]
    now[0] = 11.0
    cache.get(np.array([3]), far())
    assert inner.calls[-1] == [3]  # expired


class FailingClient:
    """A runtime client whose every call fails, counting the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def batch_get_record(self, **_: object) -> dict:
        self.calls += 1
        raise ConnectionError("connection refused")


def breaker_source(
    artifact: ModelArtifact, strict: bool = False
) -> tuple[FeatureStoreSource, FailingClient, list[float]]:
    now = [0.0]
    settings = Settings(feature_source="featurestore", feature_group_name="tiny-items", region="us-east-1",
                        feature_store_strict=strict, breaker_failures=3, breaker_open_s=5.0)
    client = FailingClient()
    breaker = CircuitBreaker("feature-store:tiny-items", 3, 5.0, clock=lambda: now[0])
    runtime = RuntimeResources(settings, client_factory=lambda _settings: client)
    source = FeatureStoreSource(artifact, settings, fallback=EmbeddedFeatureSource(artifact), breaker=breaker,
                                runtime=runtime)
    return source, client, now


def test_open_breaker_answers_from_the_snapshot_without_calling(artifact: ModelArtifact) -> None:
    source, client, now = breaker_source(artifact)
    idx = np.array([0, 3])
    for _ in range(3):
        assert source.get(idx, far()).degraded is True
    assert client.calls == 3
    for _ in range(10):
        batch = source.get(idx, far())
        assert batch.degraded is True
        np.testing.assert_allclose(batch.values, artifact.item_features[idx])
    assert client.calls == 3  # the breaker is open: the store is not called at all
    now[0] += 5.0
    source.get(idx, far())
    assert client.calls == 4  # one probe; it failed, so the breaker is open again
    source.get(idx, far())
    assert client.calls == 4


def test_open_breaker_is_a_503_in_strict_mode(artifact: ModelArtifact) -> None:
    source, client, _ = breaker_source(artifact, strict=True)
    for _ in range(3):
        with pytest.raises(FeatureSourceUnavailable):
            source.get(np.array([1]), far())
    with pytest.raises(FeatureSourceUnavailable, match="circuit breaker open"):
        source.get(np.array([1]), far())
    assert client.calls == 3


def test_probe_success_closes_the_breaker(artifact: ModelArtifact) -> None:
    source, stub = stubbed_source(artifact)
    source._breaker = CircuitBreaker("b", 1, 0.0)
    stub.add_client_error("batch_get_record", "ServiceUnavailable", "down", 503)
    stub.add_response("batch_get_record", response([record("i1")]), request_for(["i1"]))
    with stub:
        assert source.get(np.array([1]), far()).degraded is True
        assert source._breaker.state == "open"
        assert source.get(np.array([1]), far()).degraded is False  # open_seconds 0: the next call probes
    assert source._breaker.state == "closed"


def test_the_recommender_lists_one_breaker_per_group_it_reads(artifact: ModelArtifact) -> None:
    settings = Settings(feature_source="cached", feature_group_name="tiny-items", region="us-east-1",
                        user_history_feature_group_name="tiny-history")
    recommender = TwoStageRecommender(artifact, settings)
    assert [b.name for b in recommender.breakers] == ["feature-store:tiny-items", "feature-store:tiny-history"]
    assert TwoStageRecommender(artifact, Settings()).breakers == []  # the artifact's features only
    runtime = RuntimeResources(settings)
    assert runtime.breaker("g") is runtime.breaker("g") and runtime.breaker("g") is not runtime.breaker("h")
