"""The training ingestion command and the serving Feature Store source, against the local server.

Real boto3 clients on both sides, the real wire protocol in between: what is ingested from the
artifact's snapshot must come back through ``batch_get_record`` as the same ranker inputs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from local_test.feature_store.testing import FeatureStoreServer, make_clients
from training.__main__ import main
from twostage_rec.artifact import ModelArtifact, load_artifact
from twostage_rec.features import EmbeddedFeatureSource, FeatureStoreSource
from twostage_rec.recommender import TwoStageRecommender
from twostage_rec.request import RecommendationRequest
from twostage_rec.settings import Settings


@pytest.fixture(scope="module")
def feature_store() -> Iterator[FeatureStoreServer]:
    with FeatureStoreServer() as server:
        yield server


@pytest.fixture(scope="module")
def ingested(feature_store: FeatureStoreServer, tiny_model_dir: Path, monkeypatch_module: pytest.MonkeyPatch) -> ModelArtifact:
    monkeypatch_module.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch_module.setenv("AWS_SECRET_ACCESS_KEY", "test")
    argv = ["feature-store", "setup", "--model", str(tiny_model_dir), "--region", "us-east-1",
            "--endpoint-url", feature_store.endpoint_url]
    assert main(argv) == 0
    return load_artifact(tiny_model_dir)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def settings_for(feature_store: FeatureStoreServer, **extra: object) -> Settings:
    return Settings(
        feature_source="featurestore",
        feature_group_name="tiny-items",
        region="us-east-1",
        feature_store_endpoint_url=feature_store.endpoint_url,
        **extra,  # type: ignore[arg-type]
    )


def test_ingestion_created_the_group_and_every_record(feature_store: FeatureStoreServer, ingested: ModelArtifact) -> None:
    sagemaker, runtime = make_clients(feature_store.endpoint_url)
    described = sagemaker.describe_feature_group(FeatureGroupName="tiny-items")
    assert described["FeatureGroupStatus"] == "Created"
    assert described["RecordIdentifierFeatureName"] == "item_id"
    record = runtime.get_record(FeatureGroupName="tiny-items", RecordIdentifierValueAsString="i3")["Record"]
    values = {f["FeatureName"]: f["ValueAsString"] for f in record}
    assert values["category"] == "odd" and float(values["price"]) == 40.0 and values["item_rating_count"] == "70"


def test_source_returns_the_snapshot_values(feature_store: FeatureStoreServer, ingested: ModelArtifact) -> None:
    source = FeatureStoreSource(ingested, settings_for(feature_store), fallback=None)
    idx = np.arange(ingested.manifest.n_items)
    batch = source.get(idx, time.monotonic() + 5)
    assert batch.degraded is False
    np.testing.assert_allclose(batch.values, EmbeddedFeatureSource(ingested).get(idx, 0).values, rtol=1e-6)


def test_recommender_through_the_feature_store_matches_embedded(feature_store: FeatureStoreServer, ingested: ModelArtifact) -> None:
    via_store = TwoStageRecommender(ingested, settings_for(feature_store))
    embedded = TwoStageRecommender(ingested, Settings())
    for user in ("alice", "bob", "carol", "someone-new"):
        got = via_store.recommend(RecommendationRequest(user, top_k=4))
        assert got.degraded is False
        assert got.items == embedded.recommend(RecommendationRequest(user, top_k=4)).items


def test_faults_degrade_to_the_snapshot_and_recover(feature_store: FeatureStoreServer, ingested: ModelArtifact) -> None:
    rec = TwoStageRecommender(ingested, settings_for(feature_store, feature_store_max_attempts=1))
    request = RecommendationRequest("alice", top_k=3)
    feature_store.set_faults(throttle_rate=1.0)
    try:
        degraded = rec.recommend(request)
    finally:
        feature_store.clear_faults()
    assert degraded.degraded is True and len(degraded.items) == 3
    recovered = rec.recommend(request)
    assert recovered.degraded is False and recovered.items == degraded.items
