"""The server as a process: command line, signals, durability after SIGKILL, concurrent clients."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from local_test.feature_store.faults import FaultConfig
from local_test.feature_store.testing import FeatureStoreServer, make_clients

REPO_ROOT = Path(__file__).resolve().parents[2]


def create_group(sagemaker: Any) -> str:
    name = f"items-{uuid.uuid4().hex[:8]}"
    sagemaker.create_feature_group(
        FeatureGroupName=name, RecordIdentifierFeatureName="item_id", EventTimeFeatureName="event_time",
        FeatureDefinitions=[{"FeatureName": "item_id", "FeatureType": "String"},
                            {"FeatureName": "event_time", "FeatureType": "Fractional"},
                            {"FeatureName": "version", "FeatureType": "Integral"}],
        OnlineStoreConfig={"EnableOnlineStore": True},
    )
    return name


def record(item_id: str, version: int) -> list[dict[str, str]]:
    # version mirrors event_time, so a reader can spot a torn or out-of-order record.
    return [{"FeatureName": "item_id", "ValueAsString": item_id},
            {"FeatureName": "event_time", "ValueAsString": str(version)},
            {"FeatureName": "version", "ValueAsString": str(version)}]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "local_test.feature_store", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def test_records_survive_sigkill(tmp_path: Path) -> None:
    with FeatureStoreServer(tmp_path / "fs.sqlite") as server:
        sagemaker, runtime = make_clients(server.endpoint_url)
        group = create_group(sagemaker)
        for i in range(50):
            runtime.put_record(FeatureGroupName=group, Record=record(f"i{i}", i))
        server.kill()
        server.start()  # same port and database: the old clients keep working
        assert sagemaker.describe_feature_group(FeatureGroupName=group)["FeatureGroupStatus"] == "Created"
        response = runtime.batch_get_record(Identifiers=[
            {"FeatureGroupName": group, "RecordIdentifiersValueAsString": [f"i{i}" for i in range(50)]}])
        found = sorted(r["RecordIdentifierValueAsString"] for r in response["Records"])
        assert found == sorted(f"i{i}" for i in range(50))
        assert server.stop() == 0  # SIGTERM is a clean exit


def test_concurrent_writers_and_readers() -> None:
    item_ids = [f"i{i}" for i in range(10)]
    writes_per_writer = 60
    with FeatureStoreServer() as server:
        sagemaker, _ = make_clients(server.endpoint_url)
        group = create_group(sagemaker)
        problems: list[str] = []
        reads = [0]
        written: dict[str, int] = {}
        written_lock = threading.Lock()
        writers_done = threading.Event()

        def write(writer: int) -> None:
            _, runtime = make_clients(server.endpoint_url)
            rng = random.Random(writer)
            for _ in range(writes_per_writer):
                item_id, version = rng.choice(item_ids), rng.randrange(1, 10**6)
                runtime.put_record(FeatureGroupName=group, Record=record(item_id, version))
                with written_lock:
                    written[item_id] = max(written.get(item_id, 0), version)

        def read() -> None:
            _, runtime = make_clients(server.endpoint_url)
            while not writers_done.is_set():
                response = runtime.batch_get_record(
                    Identifiers=[{"FeatureGroupName": group, "RecordIdentifiersValueAsString": item_ids}])
                reads[0] += 1
                for found in response["Records"]:
                    values = {fv["FeatureName"]: fv["ValueAsString"] for fv in found["Record"]}
                    if values["event_time"] != values["version"]:
                        problems.append(f"torn record {values}")

        def guarded(target: Any, *args: Any) -> None:
            try:
                target(*args)
            except Exception as error:  # a failure in a thread must fail the test
                problems.append(f"{target.__name__}: {error!r}")

        writers = [threading.Thread(target=guarded, args=(write, w)) for w in range(4)]
        readers = [threading.Thread(target=guarded, args=(read,)) for _ in range(2)]
        for thread in writers + readers:
            thread.start()
        for thread in writers:
            thread.join()
        writers_done.set()
        for thread in readers:
            thread.join()

        _, runtime = make_clients(server.endpoint_url)
        final = runtime.batch_get_record(
            Identifiers=[{"FeatureGroupName": group, "RecordIdentifiersValueAsString": item_ids}])["Records"]
        stored = {r["RecordIdentifierValueAsString"]: int(fv["ValueAsString"])
                  for r in final for fv in r["Record"] if fv["FeatureName"] == "version"}
        assert problems == []
        assert reads[0] > 0
        assert stored == written  # the latest EventTime won for every id, whatever the arrival order
        assert server.stats()["PutRecord"] == 4 * writes_per_writer


def test_listening_line_and_sigint(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "local_test.feature_store", "serve", "--port", "0", "--db", str(tmp_path / "fs.sqlite")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = process.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith("Feature Store listening on http://127.0.0.1:")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert stdout == "" and stderr == ""


def test_fault_flags_from_the_command_line() -> None:
    with FeatureStoreServer(faults={"throttle_rate": 1.0, "seed": 7}) as server:
        assert server.set_faults() == FaultConfig().to_dict()  # a POST replaces every setting
        server.restart()  # the command-line settings come back with the process
        sagemaker, runtime = make_clients(server.endpoint_url,
                                          config=Config(retries={"mode": "standard", "total_max_attempts": 1}))
        group = create_group(sagemaker)  # the control plane is never faulted
        with pytest.raises(ClientError, match="ThrottlingException"):
            runtime.get_record(FeatureGroupName=group, RecordIdentifierValueAsString="a")


@pytest.mark.parametrize(("args", "message"), [
    (["--db", "/no/such/dir/fs.sqlite"], "directory /no/such/dir does not exist"),
    (["--db", "fs.sqlite", "--throttle-rate", "3"], "throttle_rate must be a number from 0 to 1"),
])
def test_bad_command_lines(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("serve", "--port", "0", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
