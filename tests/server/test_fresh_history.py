"""Fresh history through the real model server and the local Feature Store: an event recorded with
``python -m training events put`` changes the very next answer; a broken or malformed store degrades
the answer, never fails it; ``recent_items`` in the request count too."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_test.feature_store.testing import FeatureStoreServer, make_clients
from tests.server.harness import REPO, Server, restart
from training.feature_store import create_user_history_group, seed_user_histories, user_history_schema
from twostage_rec.artifact import ModelArtifact, load_artifact
from twostage_rec.errors import FeatureSourceUnavailable
from twostage_rec.history_store import encode_history_record
from twostage_rec.recommender import TwoStageRecommender
from twostage_rec.request import RecommendationRequest
from twostage_rec.settings import Settings

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}


@pytest.fixture(scope="module")
def artifact(tiny_model_dir: Path) -> ModelArtifact:
    return load_artifact(tiny_model_dir)


@pytest.fixture(scope="module")
def store(artifact: ModelArtifact) -> Iterator[tuple[FeatureStoreServer, str]]:
    with pytest.MonkeyPatch.context() as patch:
        for key, value in CREDENTIALS.items():
            patch.setenv(key, value)
        with FeatureStoreServer() as server:
            sagemaker, runtime = make_clients(server.endpoint_url)
            schema = user_history_schema(artifact.manifest)
            create_user_history_group(sagemaker, schema, wait_s=10)
            assert seed_user_histories(runtime, artifact, schema, show_progress=False).ok
            yield server, schema.feature_group_name


def record(store: FeatureStoreServer, group: str, user_id: str, item_id: str, timestamp: int) -> None:
    command = [
        sys.executable,
        "-m",
        "training",
        "events",
        "put",
        "--feature-group",
        group,
        "--user-id",
        user_id,
        "--item-id",
        item_id,
        "--timestamp",
        str(timestamp),
        "--region",
        "us-east-1",
        "--endpoint-url",
        store.endpoint_url,
        "--no-progress",
    ]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO / 'code'}:{REPO}", **CREDENTIALS}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def items(reply: dict) -> list[str]:
    return [r["item_id"] for r in reply["recommendations"]]


def test_an_event_changes_the_next_answer_through_the_model_server(
    server: Server, store: tuple[FeatureStoreServer, str]
) -> None:
    fs, group = store
    restart(
        server,
        USER_HISTORY_FEATURE_GROUP_NAME=group,
        FEATURE_STORE_ENDPOINT_URL=fs.endpoint_url,
        AWS_REGION="us-east-1",
        **CREDENTIALS,
    )
    try:
        before = server.invoke({"user_id": "carol", "top_k": 6}).json()
        assert before["degraded"] is False and len(before["recommendations"]) == 6  # carol has seen nothing
        watched = items(before)[0]
        record(fs, group, "carol", watched, timestamp=int(time.time()))
        written = time.monotonic()
        after = server.invoke({"user_id": "carol", "top_k": 6}).json()
        seen_after_s = time.monotonic() - written
        assert watched not in items(after) and len(items(after)) == 5 and after["degraded"] is False
        # A batch: one read for every user; an unknown user with fresh history is personalised.
        record(fs, group, "stranger", "i4", timestamp=int(time.time()))
        batch = server.invoke({"instances": [{"user_id": "carol"}, {"user_id": "stranger"}]}).json()["predictions"]
        assert watched not in items(batch[0])
        assert batch[1]["fallback"] is None and "i4" not in items(batch[1])
        print(f"\n[fresh-history] the answer after the write came {seen_after_s * 1000:.0f} ms after it returned")
    finally:
        restart(server)


def test_recent_items_count_and_bad_ones_are_a_400(server: Server) -> None:
    reply = server.invoke({"user_id": "alice", "recent_items": ["i1", {"item_id": "nope", "timestamp": 5}]})
    assert reply.status == 200
    body = reply.json()
    assert "i1" not in items(body) and body["ignored_recent_items"] == 1
    bad = server.invoke({"user_id": "alice", "recent_items": [{"item_id": "i1", "timestamp": "soon"}]})
    assert bad.status == 400 and "recent_items[0].timestamp" in bad.json()["message"]


def test_a_malformed_record_is_ignored_with_one_warning_and_degrades(
    artifact: ModelArtifact, store: tuple[FeatureStoreServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    fs, group = store
    _, runtime = make_clients(fs.endpoint_url)
    schema = user_history_schema(artifact.manifest)
    record_ = encode_history_record(schema, "bob", [], version=99)
    record_[2]["ValueAsString"] = "[1, 2"  # someone wrote it by hand
    runtime.put_record(FeatureGroupName=group, Record=record_)
    settings = Settings(
        user_history_feature_group_name=group, feature_store_endpoint_url=fs.endpoint_url, region="us-east-1"
    )
    recommender = TwoStageRecommender(artifact, settings)
    with caplog.at_level("WARNING", logger="twostage_rec"):
        answer = recommender.recommend(RecommendationRequest("bob", top_k=3))
    assert answer.degraded is True and len(answer.items) == 3
    warnings = [r.getMessage() for r in caplog.records if "bob" in r.getMessage()]
    assert len(warnings) == 1 and "ignored" in warnings[0]


def test_a_store_that_is_down_degrades_or_503s_in_strict_mode(artifact: ModelArtifact) -> None:
    settings = Settings(
        user_history_feature_group_name="anything",
        feature_store_endpoint_url="http://127.0.0.1:9",
        region="us-east-1",
        feature_store_connect_timeout_s=0.2,
    )
    answer = TwoStageRecommender(artifact, settings).recommend(RecommendationRequest("alice", top_k=3))
    assert answer.degraded is True and len(answer.items) == 3  # the artifact's history answered
    strict = TwoStageRecommender(artifact, Settings(**{**settings.__dict__, "feature_store_strict": True}))
    with pytest.raises(FeatureSourceUnavailable):
        strict.recommend(RecommendationRequest("alice", top_k=3))
