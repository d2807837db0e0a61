"""User histories through the real wire protocol: recording events, reading them back for serving.

Real boto3 clients against the local Feature Store server. The concurrency test releases writer
threads in this process and in two spawned processes at one barrier, all recording events for
the same user: none may be lost.
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from local_test.feature_store.testing import FeatureStoreServer, make_clients
from tests.support.event_writers import record_after_barrier, writer_process
from training.__main__ import main
from training.events import UserEvent, record_events, seed_histories
from training.feature_store import create_user_history_group
from twostage_rec.artifact import UserHistorySchema, load_artifact
from twostage_rec.circuit_breaker import CircuitBreaker
from twostage_rec.errors import FeatureSourceUnavailable
from twostage_rec.history_store import (
    FeatureStoreHistorySource,
    HistoryEvent,
    artifact_user_history,
    encode_history_record,
)
from twostage_rec.settings import Settings

E = HistoryEvent
MAX_LENGTH = 50


@pytest.fixture(scope="module")
def feature_store() -> Iterator[FeatureStoreServer]:
    with FeatureStoreServer() as server:
        yield server


@pytest.fixture(scope="module", autouse=True)
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "test")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        yield


@pytest.fixture
def group(feature_store: FeatureStoreServer) -> str:
    """A fresh user-history group per test."""
    sagemaker, _ = make_clients(feature_store.endpoint_url)
    return create_user_history_group(sagemaker, UserHistorySchema(f"history-{uuid.uuid4().hex[:8]}"), wait_s=10)


def settings_for(store: FeatureStoreServer, group: str, **settings: Any) -> Settings:
    fields: dict[str, Any] = {"region": "us-east-1", "feature_store_endpoint_url": store.endpoint_url,
                              "feature_store_deadline_ms": 2000.0, "user_history_feature_group_name": group,
                              **settings}
    return Settings(**fields)


def reader(store: FeatureStoreServer, group: str, **settings: Any) -> FeatureStoreHistorySource:
    return FeatureStoreHistorySource(UserHistorySchema(group), settings_for(store, group, **settings))


def history(store: FeatureStoreServer, group: str, *users: str) -> dict[str, list[HistoryEvent]]:
    batch = reader(store, group).get(list(users), time.monotonic() + 5)
    assert batch.degraded is False
    return batch.events


def cli(store: FeatureStoreServer, group: str, *args: str) -> int:
    return main(["events", "put", "--feature-group", group, "--region", "us-east-1",
                 "--endpoint-url", store.endpoint_url, "--no-progress", *args])


def test_the_group_is_online_with_a_fractional_version_and_no_ttl(feature_store: FeatureStoreServer,
                                                                   group: str) -> None:
    sagemaker, _ = make_clients(feature_store.endpoint_url)
    described = sagemaker.describe_feature_group(FeatureGroupName=group)
    assert (described["RecordIdentifierFeatureName"], described["EventTimeFeatureName"]) == ("user_id", "event_time")
    assert {d["FeatureName"]: d["FeatureType"] for d in described["FeatureDefinitions"]} == {
        "user_id": "String", "event_time": "Fractional", "item_ids": "String", "timestamps": "String"}
    assert described["OnlineStoreConfig"] == {"EnableOnlineStore": True}  # no TtlDuration
    assert create_user_history_group(sagemaker, UserHistorySchema(group), wait_s=10) == group  # idempotent


def test_single_event_command_and_the_next_read_sees_it(feature_store: FeatureStoreServer, group: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(feature_store, group, "--user-id", "alice", "--item-id", "i1", "--timestamp", "100") == 0
    assert f"stored 1 of 1 events for 1 users in {group}" in capsys.readouterr().out
    assert history(feature_store, group, "alice", "bob") == {"alice": [E("i1", 100)]}
    assert cli(feature_store, group, "--user-id", "alice", "--item-id", "i2", "--timestamp",
               "1970-01-01T00:03:20Z") == 0
    assert history(feature_store, group, "alice") == {"alice": [E("i1", 100), E("i2", 200)]}  # no cache
    before = int(time.time())
    assert cli(feature_store, group, "--user-id", "bob", "--item-id", "i3") == 0  # default: now
    (event,) = history(feature_store, group, "bob")["bob"]
    assert event.item_id == "i3" and before <= event.timestamp <= time.time()


def test_file_mode_good_and_bad_files(feature_store: FeatureStoreServer, group: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "events.csv"
    good.write_text("user_id,item_id,timestamp\nu1,a,10\nu2,b,20\nu1,c,5\nu3,d,30\nu1,a,10\n", encoding="utf-8")
    assert cli(feature_store, group, "--file", str(good), "--concurrency", "2") == 0
    assert "stored 5 of 5 events for 3 users" in capsys.readouterr().out
    assert history(feature_store, group, "u1", "u2", "u3") == {
        "u1": [E("c", 5), E("a", 10)], "u2": [E("b", 20)], "u3": [E("d", 30)]}

    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,timestamp\nu4,a,10\nu5,b,later\nu6,c,30\n", encoding="utf-8")
    missing = tmp_path / "missing.csv"
    missing.write_text("user_id,timestamp\nu4,10\n", encoding="utf-8")
    feature_store.reset_stats()
    for path, problem in [(bad, "line 3, column 'timestamp'"), (missing, "column 'item_id': missing required column")]:
        assert cli(feature_store, group, "--file", str(path)) == 2
        captured = capsys.readouterr()
        (line,) = captured.err.strip().splitlines()
        assert line.startswith(f"error: {path}, ") and problem in line and line.endswith("nothing stored (0 events)")
        assert "Traceback" not in captured.err + captured.out
    assert feature_store.stats().get("PutRecord", 0) == 0  # the whole file is checked before any write
    assert history(feature_store, group, "u4", "u6") == {}


def test_unreachable_store_exits_1_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: connections are refused
    code = main(["events", "put", "--feature-group", "g", "--user-id", "u", "--item-id", "i", "--region",
                 "us-east-1", "--endpoint-url", f"http://127.0.0.1:{port}", "--max-attempts", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert "stored 0 of 1 events" in captured.out
    assert "error: user 'u': 1 event(s) not stored: reading its record failed: EndpointConnectionError" in captured.err
    assert "Traceback" not in captured.err


def test_a_rival_that_lands_first_is_merged_not_overwritten(feature_store: FeatureStoreServer, group: str) -> None:
    schema = UserHistorySchema(group)
    _, runtime = make_clients(feature_store.endpoint_url)
    seed_histories(runtime, schema, [("u", [E("old", 1)])], MAX_LENGTH, show_progress=False)

    class RivalFirst:
        """Our client, except that a rival writer records its event just before our first put."""

        def __init__(self) -> None:
            self.rival_report: Any = None

        def __getattr__(self, name: str) -> Any:
            return getattr(runtime, name)

        def put_record(self, **kwargs: Any) -> Any:
            if self.rival_report is None:
                _, rival = make_clients(feature_store.endpoint_url)
                self.rival_report = record_events(rival, schema, [UserEvent("u", "theirs", 3)], MAX_LENGTH,
                                                  show_progress=False)
            return runtime.put_record(**kwargs)

    client = RivalFirst()
    report = record_events(client, schema, [UserEvent("u", "mine", 2)], MAX_LENGTH, show_progress=False)
    assert client.rival_report.ok and report.ok
    assert report.conflicts == 1  # the server ignored our put (same version as the rival's)
    assert history(feature_store, group, "u") == {"u": [E("old", 1), E("mine", 2), E("theirs", 3)]}


def test_reseeding_keeps_events_recorded_after_the_training_data(feature_store: FeatureStoreServer,
                                                                 group: str) -> None:
    schema = UserHistorySchema(group)
    _, runtime = make_clients(feature_store.endpoint_url)
    training = [("u", [E("a", 1), E("b", 2)]), ("v", [E("c", 1)]), ("nobody", [])]
    assert seed_histories(runtime, schema, training, 3, show_progress=False).users_stored == 2
    record_events(runtime, schema, [UserEvent("u", "fresh", 9)], 3, show_progress=False)
    retrained = [("u", [E("a", 1), E("b", 2), E("c", 3)]), ("v", [E("c", 1)])]
    report = seed_histories(runtime, schema, retrained, 3, show_progress=False)
    assert report.ok and report.writes == 1  # v is unchanged: nothing written for it
    assert history(feature_store, group, "u", "v") == {"u": [E("b", 2), E("c", 3), E("fresh", 9)],
                                                       "v": [E("c", 1)]}


def test_threads_and_processes_recording_for_one_user_lose_nothing(feature_store: FeatureStoreServer,
                                                                   group: str) -> None:
    processes, threads_per_writer = 2, 3
    writers = (processes + 1) * threads_per_writer  # + the threads of this process
    # Each writer: two events for the shared user (same timestamps across writers) and one of its own.
    events = [[UserEvent("hot", f"w{w}-e{k}", 1000 + k) for k in range(2)] + [UserEvent(f"own-{w}", "x", 1)]
              for w in range(writers)]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(writers)
    results = context.Queue()
    children = [
        context.Process(target=writer_process, args=(
            feature_store.endpoint_url, group, events[p * threads_per_writer : (p + 1) * threads_per_writer],
            barrier, MAX_LENGTH, results))
        for p in range(processes)
    ]
    for child in children:
        child.start()
    outcomes: list[dict[str, Any]] = []
    lock = threading.Lock()

    def local(events_of_thread: list[UserEvent]) -> None:
        outcome = record_after_barrier(feature_store.endpoint_url, group, events_of_thread, barrier, MAX_LENGTH)
        with lock:
            outcomes.append(outcome)

    local_threads = [threading.Thread(target=local, args=(e,)) for e in events[processes * threads_per_writer :]]
    for thread in local_threads:
        thread.start()
    for thread in local_threads:
        thread.join()
    for _ in children:
        outcomes.extend(results.get(timeout=120))
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    assert len(outcomes) == writers
    assert [f for o in outcomes for f in o["failures"]] == []
    stored = history(feature_store, group, "hot", *(f"own-{w}" for w in range(writers)))
    expected_hot = sorted((e.item_id, e.timestamp) for es in events for e in es if e.user_id == "hot")
    assert sorted((e.item_id, e.timestamp) for e in stored["hot"]) == expected_hot
    assert all(stored[f"own-{w}"] == [E("x", 1)] for w in range(writers))
    print(f"\n[events] {writers} writers, {sum(o['conflicts'] for o in outcomes)} lost versions merged and retried")


def test_reader_chunks_ignores_malformed_records_and_sees_no_record_as_absent(
    feature_store: FeatureStoreServer, group: str, caplog: pytest.LogCaptureFixture
) -> None:
    schema = UserHistorySchema(group)
    _, runtime = make_clients(feature_store.endpoint_url)
    users = [f"user-{i:03d}" for i in range(150)]
    seed_histories(runtime, schema, [(u, [E(f"item-{u}", 7)]) for u in users[::10]], MAX_LENGTH,
                   show_progress=False)
    hand_written = encode_history_record(schema, "mallory", [], 1)
    hand_written[2]["ValueAsString"] = "['single quotes']"
    runtime.put_record(FeatureGroupName=group, Record=hand_written)
    feature_store.reset_stats()
    with caplog.at_level(logging.WARNING, logger="twostage_rec.history_store"):
        batch = reader(feature_store, group, feature_store_strict=True).get([*users, "mallory"], time.monotonic() + 5)
    assert feature_store.stats()["BatchGetRecord"] == 2  # 151 users: two calls of at most 100
    assert batch.degraded is True  # the malformed record, even in strict mode
    assert batch.events == {u: [E(f"item-{u}", 7)] for u in users[::10]}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "'mallory'" in warning and "not JSON" in warning


def test_store_down_degrades_and_the_breaker_stops_calling() -> None:
    with FeatureStoreServer() as store:
        sagemaker, runtime = make_clients(store.endpoint_url)
        group = create_user_history_group(sagemaker, UserHistorySchema("history-outage"), wait_s=10)
        seed_histories(runtime, UserHistorySchema(group), [("alice", [E("i1", 1)])], MAX_LENGTH,
                       show_progress=False)
        source = reader(store, group, feature_store_deadline_ms=300.0, breaker_failures=2, breaker_open_s=600.0)
        strict = reader(store, group, feature_store_strict=True, feature_store_max_attempts=1)
        assert source.get(["alice"], time.monotonic() + 5).events == {"alice": [E("i1", 1)]}
        store.set_faults(latency_ms=2000)  # a store that hangs past the deadline
        for _ in range(2):  # two timed-out reads open the breaker
            assert source.get(["alice"], time.monotonic() + 0.3).degraded is True
        store.reset_stats()
        for _ in range(5):
            batch = source.get(["alice"], time.monotonic() + 0.3)
            assert batch.degraded is True and batch.events == {}
        assert store.stats().get("BatchGetRecord", 0) == 0  # open: no call reaches the store
        store.clear_faults()
        store.kill()  # connection refused
        with pytest.raises(FeatureSourceUnavailable):
            strict.get(["alice"], time.monotonic() + 5)


def test_breaker_probe_closes_it_when_the_store_is_back(feature_store: FeatureStoreServer, group: str) -> None:
    now = [0.0]
    schema = UserHistorySchema(group)
    source = FeatureStoreHistorySource(schema, settings_for(feature_store, group),
                                       breaker=CircuitBreaker("history", 1, 5.0, clock=lambda: now[0]))
    _, runtime = make_clients(feature_store.endpoint_url)
    seed_histories(runtime, schema, [("alice", [E("i1", 1)])], MAX_LENGTH, show_progress=False)
    feature_store.set_faults(error_rate=1.0)
    try:
        assert source.get(["alice"], time.monotonic() + 5).degraded is True
    finally:
        feature_store.clear_faults()
    assert source.get(["alice"], time.monotonic() + 5).degraded is True  # still open: not even tried
    now[0] += 5.0
    assert source.get(["alice"], time.monotonic() + 5).events == {"alice": [E("i1", 1)]}  # the probe


def test_setup_creates_and_seeds_both_groups_and_reseeding_keeps_fresh_events(
    feature_store: FeatureStoreServer, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = load_artifact(tiny_model_dir)
    group = f"setup-{uuid.uuid4().hex[:8]}"
    setup = ["feature-store", "setup", "--model", str(tiny_model_dir), "--region", "us-east-1",
             "--endpoint-url", feature_store.endpoint_url, "--user-history-group", group]
    trained = {u: artifact_user_history(artifact, i) for i, u in enumerate(artifact.user_ids)}
    trained = {u: events for u, events in trained.items() if events}  # no history: no record
    assert len(trained) == 2
    assert main(setup) == 0
    assert f"seeded {len(trained)} user histories into {group}" in capsys.readouterr().out
    sagemaker, _ = make_clients(feature_store.endpoint_url)
    assert sagemaker.describe_feature_group(FeatureGroupName=group)["EventTimeFeatureName"] == "event_time"
    seeded = history(feature_store, group, *artifact.user_ids)
    assert seeded == trained

    user = artifact.user_ids[0]
    fresh = E("i5", 2_000_000_000)  # recorded after the training data
    assert cli(feature_store, group, "--user-id", user, "--item-id", fresh.item_id, "--timestamp",
               str(fresh.timestamp)) == 0
    assert main(setup) == 0  # e.g. a new model deployed: its training history is merged in again
    assert history(feature_store, group, user)[user] == [*seeded[user], fresh]


def test_setup_default_group_name_comes_from_the_manifest(feature_store: FeatureStoreServer,
                                                          tiny_model_dir: Path) -> None:
    expected = load_artifact(tiny_model_dir).manifest.user_history.feature_group_name  # type: ignore[union-attr]
    assert main(["feature-store", "create", "--model", str(tiny_model_dir), "--region", "us-east-1",
                 "--endpoint-url", feature_store.endpoint_url]) == 0
    sagemaker, _ = make_clients(feature_store.endpoint_url)
    assert sagemaker.describe_feature_group(FeatureGroupName=expected)["FeatureGroupStatus"] == "Created"
