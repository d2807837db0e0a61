"""SIGTERM to ``serve`` during traffic: what the requests in flight get, and that everything stops.

``serve`` forwards SIGTERM to multi-model-server's process group at once. MMS's shutdown closes
every client connection about 0.3 s later: requests that finish before that are answered, the
others are reset (no HTTP answer at all), and new connections are refused. Nothing is answered
with a 5xx. A request still working when the connections close is lost, unless
``SERVE_DRAIN_SECONDS`` makes ``serve`` wait that long before passing SIGTERM on (tested below). SageMaker stops routing to an instance before it
stops the container, so this matters for ``docker stop`` and local runs more than for endpoints.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from local_test.feature_store.testing import FeatureStoreServer, make_clients
from reliability.load import Call, Load, Outcome
from tests.server.harness import STOP_TIMEOUT_S, Server, restart
from training.feature_store import create_item_feature_group, ingest_items
from twostage_rec.artifact import load_artifact

FAST = [Call(b'{"user_id": "alice", "top_k": 3}'), Call(b'{"user_id": "carol"}')]
FS_LATENCY_MS = 300.0  # each request waits this long on the Feature Store: requests stay in flight


@dataclass(frozen=True)
class Shutdown:
    exit_status: int
    exit_s: float  # SIGTERM to serve's exit
    in_flight: list[Outcome]  # started before SIGTERM, finished after
    after: list[Outcome]  # started after SIGTERM
    left_running: list[psutil.Process]

    def line(self) -> str:
        in_flight, after = dict(Counter(o.kind for o in self.in_flight)), dict(Counter(o.kind for o in self.after))
        return f"exit {self.exit_status} after {self.exit_s:.2f} s; in flight {in_flight}; sent after {after}"


def sigterm_during_traffic(server: Server, calls: list[Call], concurrency: int = 8, lead_s: float = 1.5) -> Shutdown:
    descendants = psutil.Process(server.process.pid).children(recursive=True)
    with Load("127.0.0.1", server.port, calls, concurrency) as load:
        time.sleep(lead_s)
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        status = server.process.wait(STOP_TIMEOUT_S)
        exited = time.monotonic()
    _, alive = psutil.wait_procs(descendants, timeout=STOP_TIMEOUT_S)
    outcomes = load.outcomes()
    return Shutdown(
        exit_status=status,
        exit_s=exited - sent,
        in_flight=[o for o in outcomes if o.started < sent < o.finished],
        after=[o for o in outcomes if o.started >= sent],
        left_running=alive,
    )


def assert_clean_stop(result: Shutdown) -> None:
    assert result.exit_status == 128 + signal.SIGTERM
    assert result.left_running == []
    # Every call either got its answer or no HTTP answer at all: never a 5xx, never a traceback.
    assert all(o.status in (200, None) for o in result.in_flight + result.after), result.line()


@pytest.fixture
def disposable(server: Server) -> Iterator[Server]:
    """The session server for a test that stops it; restarted in place afterwards."""
    yield server
    restart(server)


def test_sigterm_during_fast_traffic(disposable: Server) -> None:
    result = sigterm_during_traffic(disposable, FAST)
    print(f"\n[shutdown-fast] {result.line()}")
    assert_clean_stop(result)
    assert result.in_flight  # the test did catch requests in flight


@pytest.fixture(scope="module")
def slow_feature_store(tiny_model_dir: Path) -> Iterator[FeatureStoreServer]:
    with pytest.MonkeyPatch.context() as patch, FeatureStoreServer() as store:
        patch.setenv("AWS_ACCESS_KEY_ID", "test")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        sagemaker, runtime = make_clients(store.endpoint_url)
        artifact = load_artifact(tiny_model_dir)
        create_item_feature_group(sagemaker, artifact, wait_s=10)
        ingest_items(runtime, artifact, show_progress=False)
        store.set_faults(latency_ms=FS_LATENCY_MS)
        yield store


def slow_env(store: FeatureStoreServer) -> dict[str, str]:
    """Settings that read features from ``store`` (300 ms a call) with a deadline above that."""
    return dict(FEATURE_GROUP_NAME="tiny-items", FEATURE_SOURCE="featurestore", AWS_REGION="us-east-1",
                FEATURE_STORE_ENDPOINT_URL=store.endpoint_url, FEATURE_STORE_DEADLINE_MS="5000",
                AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")


@pytest.fixture
def slow_server(disposable: Server, slow_feature_store: FeatureStoreServer) -> Server:
    """The session server reading features from a Feature Store that takes 300 ms a call."""
    restart(disposable, **slow_env(slow_feature_store))
    return disposable


def test_sigterm_with_slow_requests_in_flight(slow_server: Server) -> None:
    result = sigterm_during_traffic(slow_server, FAST)
    print(f"\n[shutdown-slow] {result.line()}")
    assert_clean_stop(result)
    assert len(result.in_flight) >= 4  # 8 clients, 2 workers: nearly every client waits on an answer


def test_with_a_drain_requests_in_flight_at_sigterm_are_answered(
    disposable: Server, slow_feature_store: FeatureStoreServer
) -> None:
    restart(disposable, **slow_env(slow_feature_store), SERVE_DRAIN_SECONDS="2")
    result = sigterm_during_traffic(disposable, FAST)
    print(f"\n[shutdown-drain] {result.line()}")
    assert result.exit_status == 128 + signal.SIGTERM and result.left_running == []
    assert result.in_flight
    assert [o.status for o in result.in_flight] == [200] * len(result.in_flight), result.line()
