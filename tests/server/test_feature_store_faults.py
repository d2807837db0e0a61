"""Feature Store faults, injected by the local Feature Store, against real boto3 clients.

Throttling, 5xx, answers slower than the deadline, partial batches (``Errors`` and
``UnprocessedIdentifiers``) and the server going down: callers never see an error (the snapshot
in the model answers and ``degraded`` is true), the feature fetch stays within the deadline, and
once the faults stop the next answers are not degraded. Most cases run the recommender in-process;
one goes through the real model server. Latency bounds are generous (deadline + 2 s): the figures
printed here (``pytest -s``) are what RELIABILITY.md quotes.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from local_test.feature_store.testing import FeatureStoreServer, make_clients
from reliability.load import percentile
from tests.server.harness import Server, restart
from training.feature_store import create_item_feature_group, ingest_items
from twostage_rec.artifact import ModelArtifact, load_artifact
from twostage_rec.errors import FeatureSourceUnavailable
from twostage_rec.features import EmbeddedFeatureSource, FeatureStoreSource
from twostage_rec.recommender import TwoStageRecommender
from twostage_rec.request import RecommendationRequest
from twostage_rec.settings import Settings

DEADLINE_MS = 200.0
# Short, so recovery (the first probe after the store returns) comes quickly in these tests.
BREAKER_OPEN_S = 0.5
BOUND_S = DEADLINE_MS / 1000 + 2.0  # generous: shared CI cores
GROUP = "tiny-items"
USERS = ["alice", "bob", "carol", "newcomer"]
REQUESTS_PER_FAULT = 40
# The key id is shaped like a real one so a leak would also match the audit's pattern.
KEY_ID = "AKIA" + secrets.token_hex(8).upper()
SECRET = secrets.token_urlsafe(30)


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def artifact(tiny_model_dir: Path) -> ModelArtifact:
    return load_artifact(tiny_model_dir)


@pytest.fixture(scope="module")
def feature_store(artifact: ModelArtifact, aws_env: None) -> Iterator[FeatureStoreServer]:
    with FeatureStoreServer() as store:
        sagemaker, runtime = make_clients(store.endpoint_url)
        create_item_feature_group(sagemaker, artifact, wait_s=10)
        ingest_items(runtime, artifact, show_progress=False)
        yield store


@pytest.fixture
def store(feature_store: FeatureStoreServer) -> Iterator[FeatureStoreServer]:
    """The module's Feature Store, running and fault-free before and after each test."""
    if not _running(feature_store):
        feature_store.start()
    feature_store.clear_faults()
    yield feature_store
    if not _running(feature_store):
        feature_store.start()
    feature_store.clear_faults()


def _running(store: FeatureStoreServer) -> bool:
    try:
        store.stats()
        return True
    except OSError:
        return False


def settings_for(store: FeatureStoreServer, **extra: object) -> Settings:
    fields: dict[str, object] = {"feature_source": "featurestore", "feature_group_name": GROUP, "region": "us-east-1",
                                 "feature_store_endpoint_url": store.endpoint_url,
                                 "feature_store_deadline_ms": DEADLINE_MS, "breaker_open_s": BREAKER_OPEN_S,
                                 **extra}
    return Settings(**fields)  # type: ignore[arg-type]


def ask(recommender: TwoStageRecommender, user_id: str) -> tuple[list[str], bool, float]:
    """(item ids, degraded, seconds) of one recommendation."""
    started = time.monotonic()
    answer = recommender.recommend(RecommendationRequest(user_id, top_k=4))
    return [r["item_id"] for r in answer.items], answer.degraded, time.monotonic() - started


def expected_items(artifact: ModelArtifact) -> dict[str, list[str]]:
    embedded = TwoStageRecommender(artifact, Settings())
    return {u: ask(embedded, u)[0] for u in USERS}


def recovery_s(recommender: TwoStageRecommender, timeout_s: float = 15.0) -> float:
    """Seconds until an answer is no longer degraded."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if not ask(recommender, "alice")[1]:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"still degraded {timeout_s} s after the faults stopped")


FAULTS = [
    pytest.param({"throttle_rate": 1.0}, True, id="throttling"),
    pytest.param({"throttle_rate": 0.5}, None, id="throttling-bursts"),
    pytest.param({"error_rate": 1.0}, True, id="5xx"),
    pytest.param({"latency_ms": 3 * DEADLINE_MS}, True, id="slower-than-deadline"),
    pytest.param({"unprocessed_rate": 1.0}, True, id="unprocessed"),
    pytest.param({"record_error_rate": 1.0}, True, id="record-errors"),
    pytest.param({"unprocessed_rate": 0.3, "record_error_rate": 0.1}, None, id="partial-batches"),
]


def test_healthy_feature_store_is_not_degraded(store: FeatureStoreServer, artifact: ModelArtifact) -> None:
    recommender = TwoStageRecommender(artifact, settings_for(store))
    expected = expected_items(artifact)
    for user in USERS:
        items, degraded, _ = ask(recommender, user)
        assert (items, degraded) == (expected[user], False)


@pytest.mark.parametrize(("faults", "all_degraded"), FAULTS)
def test_fault_degrades_within_the_deadline_then_recovers(
    store: FeatureStoreServer, artifact: ModelArtifact, faults: dict[str, float], all_degraded: bool | None
) -> None:
    recommender = TwoStageRecommender(artifact, settings_for(store))
    expected = expected_items(artifact)
    assert ask(recommender, "alice")[1] is False  # the client exists and the store answers
    store.set_faults(**faults, seed=7)
    latencies, flags = [], []
    for n in range(REQUESTS_PER_FAULT):
        user = USERS[n % len(USERS)]
        items, degraded, seconds = ask(recommender, user)  # never raises: that is the point
        assert items == expected[user]  # the snapshot (or a mix of rows) gives the same answer
        latencies.append(seconds)
        flags.append(degraded)
    if all_degraded:
        assert all(flags)
    latencies.sort()
    assert latencies[-1] < BOUND_S
    store.clear_faults()
    recovered_after = recovery_s(recommender)
    print(f"\n[fs-fault {faults}] {sum(flags)}/{len(flags)} degraded; latency p50 "
          f"{percentile(latencies, 50) * 1000:.0f} ms, p99 {percentile(latencies, 99) * 1000:.0f} ms, max "
          f"{latencies[-1] * 1000:.0f} ms (deadline {DEADLINE_MS:.0f} ms); recovered {recovered_after:.2f} s after")


def test_feature_store_down_then_back(store: FeatureStoreServer, artifact: ModelArtifact) -> None:
    recommender = TwoStageRecommender(artifact, settings_for(store))
    expected = expected_items(artifact)
    assert ask(recommender, "alice")[1] is False
    store.kill()
    latencies = []
    for user in USERS * 5:
        items, degraded, seconds = ask(recommender, user)
        assert items == expected[user] and degraded
        latencies.append(seconds)
    assert max(latencies) < BOUND_S
    started = time.monotonic()
    store.start()
    start_s = time.monotonic() - started
    recovered_after = recovery_s(recommender)
    print(f"\n[fs-down] {len(latencies)} answers, all degraded, max {max(latencies) * 1000:.0f} ms; the store "
          f"took {start_s:.2f} s to restart, the first healthy answer came {recovered_after:.2f} s later")


def test_open_breaker_stops_calling_a_hanging_store(store: FeatureStoreServer, artifact: ModelArtifact) -> None:
    """After ``breaker_failures`` timed-out reads, no call reaches the store: answers come from the snapshot."""
    # One attempt per call: a botocore retry of a call made before the breaker opened would be
    # counted after the reset below.
    settings = settings_for(store, breaker_failures=3, breaker_open_s=600.0, feature_store_max_attempts=1)
    recommender = TwoStageRecommender(artifact, settings)
    assert ask(recommender, "alice")[1] is False
    store.set_faults(latency_ms=3 * DEADLINE_MS)
    for _ in range(3):
        assert ask(recommender, "alice")[1] is True
    store.reset_stats()
    answers = [ask(recommender, user) for user in USERS * 5]
    assert all(degraded for _, degraded, _ in answers)
    assert store.stats().get("BatchGetRecord", 0) == 0
    store.clear_faults()
    print(f"\n[fs-breaker] store hanging, breaker open: p50 "
          f"{percentile(sorted(s for _, _, s in answers), 50) * 1000:.1f} ms per answer")


def test_partial_batches_over_many_chunks_give_every_row(store: FeatureStoreServer, artifact: ModelArtifact) -> None:
    """1,000 items (10 calls of 100 in parallel): each row comes from the store or the snapshot."""
    n_items = 1000
    rng = np.random.default_rng(0)
    big = dataclasses.replace(
        artifact,
        item_ids=[f"big-{i}" for i in range(n_items)],
        item_features=np.column_stack([rng.uniform(1, 5, n_items), rng.integers(1, 500, n_items),
                                       rng.integers(0, 2, n_items), rng.uniform(1, 90, n_items)]).astype(np.float32),
    )
    ingest_items(make_clients(store.endpoint_url)[1], big, show_progress=False)
    source = FeatureStoreSource(big, settings_for(store, feature_store_deadline_ms=2000.0),
                                fallback=EmbeddedFeatureSource(big))
    idx = np.arange(n_items)
    assert source.get(idx, time.monotonic() + 5).degraded is False
    store.set_faults(unprocessed_rate=0.3, record_error_rate=0.05, seed=3)
    batch = source.get(idx, time.monotonic() + 2)
    np.testing.assert_allclose(batch.values, big.item_features, rtol=1e-6)
    assert batch.degraded  # 5% errored records are not retried: those rows come from the snapshot
    store.set_faults(unprocessed_rate=0.3, seed=3)  # unprocessed ids get one retry
    retried = source.get(idx, time.monotonic() + 2)
    np.testing.assert_allclose(retried.values, big.item_features, rtol=1e-6)


def test_strict_mode_answers_503_instead(store: FeatureStoreServer, artifact: ModelArtifact) -> None:
    recommender = TwoStageRecommender(artifact, settings_for(store, feature_store_strict=True))
    assert ask(recommender, "alice")[1] is False
    store.set_faults(error_rate=1.0)
    with pytest.raises(FeatureSourceUnavailable) as info:
        ask(recommender, "alice")
    assert int(info.value.status) == 503


def test_cache_rides_out_an_outage_for_cached_items(store: FeatureStoreServer, artifact: ModelArtifact) -> None:
    settings = settings_for(store, feature_source="cached")
    recommender = TwoStageRecommender(artifact, settings)
    for user in USERS:
        assert ask(recommender, user)[1] is False  # fills the cache
    store.kill()
    assert all(not ask(recommender, user)[1] for user in USERS)  # every candidate is cached


def test_faults_through_the_model_server(server: Server, store: FeatureStoreServer) -> None:
    """The real ``serve`` reading the local Feature Store: 200s throughout, ``degraded`` while it fails."""
    restart(server, FEATURE_GROUP_NAME=GROUP, FEATURE_SOURCE="featurestore", AWS_REGION="us-east-1",
            FEATURE_STORE_ENDPOINT_URL=store.endpoint_url, FEATURE_STORE_DEADLINE_MS=str(int(DEADLINE_MS)),
            FEATURE_STORE_BREAKER_OPEN_S=str(BREAKER_OPEN_S), AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
    try:
        def degraded_flags(n: int) -> tuple[list[bool], list[float]]:
            flags, latencies = [], []
            for i in range(n):
                started = time.monotonic()
                reply = server.invoke({"user_id": USERS[i % len(USERS)], "top_k": 3})
                latencies.append(time.monotonic() - started)
                assert reply.status == 200, reply.body[:300]
                flags.append(reply.json()["degraded"])
            return flags, latencies

        assert degraded_flags(4)[0] == [False] * 4
        figures = {}
        for name, faults in [("throttling", {"throttle_rate": 1.0}), ("5xx", {"error_rate": 1.0}),
                             ("slow", {"latency_ms": 1000.0}), ("unprocessed", {"unprocessed_rate": 1.0})]:
            store.set_faults(**faults, seed=1)
            flags, latencies = degraded_flags(20)
            assert all(flags) and max(latencies) < BOUND_S
            figures[name] = f"p99 {percentile(sorted(latencies), 99) * 1000:.0f} ms"
            store.clear_faults()
            time.sleep(BREAKER_OPEN_S)  # a worker whose breaker opened probes after this long
            # Up to one answer per worker may still be degraded while its pool drains slow calls.
            assert degraded_flags(10)[0][-4:] == [False] * 4
        store.kill()
        flags, latencies = degraded_flags(10)
        assert all(flags) and max(latencies) < BOUND_S
        store.start()
        time.sleep(BREAKER_OPEN_S)
        assert degraded_flags(10)[0][-4:] == [False] * 4
        print(f"\n[fs-through-serve] deadline {DEADLINE_MS:.0f} ms; {figures}; store down: "
              f"p99 {percentile(sorted(latencies), 99) * 1000:.0f} ms")
        log = server.output()
        assert "feature store degraded" in log  # the warnings were written...
        assert "circuit breaker feature-store:tiny-items: closed -> open" in log
        assert SECRET not in log and KEY_ID not in log  # ...without the credentials
        assert json.dumps(SECRET)[1:-1] not in log
    finally:
        restart(server)  # back to the session's settings for the tests that follow
