"""Worker death during traffic, and a short soak, on the real ``serve`` + multi-model-server.

With ``preload_model`` MMS runs one Python backend process per model that loads the model and
forks one worker per MMS worker thread. A killed worker is re-forked within about a second and
only the request it was answering fails (MMS's own 500 "Worker died."). The backend process is a
single point of failure that MMS 1.1.11 never restarts: once it is gone, dead workers are not
replaced; ``serve`` then exits so the container is restarted (its watchdog, tested below).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from reliability.load import Call, Load, Outcome, summarize
from reliability.soak import call_mix, soak
from tests.server.harness import WORKERS, Server, restart

TRAFFIC = [Call(b'{"user_id": "alice", "top_k": 3}'), Call(b'{"instances": [{"user_id": "bob"}, {"user_id": "x"}]}')]
REPLACE_TIMEOUT_S = 30.0


def processes(server: Server) -> tuple[psutil.Process | None, list[psutil.Process]]:
    """(the backend process or None, its live worker forks)."""
    java = next(p for p in psutil.Process(server.process.pid).children() if "java" in p.name())
    backend = next((p for p in java.children() if any("model_service_worker" in a for a in p.cmdline())), None)
    forks = backend.children() if backend else []
    return backend, [p for p in forks if p.status() != psutil.STATUS_ZOMBIE]


def wait_for_workers(server: Server, gone: set[int], timeout_s: float = REPLACE_TIMEOUT_S) -> float:
    """Seconds until the backend has WORKERS forks again, none of them in ``gone``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            forks = {p.pid for p in processes(server)[1]}
        except psutil.NoSuchProcess:  # one exited while we looked
            forks = set()
        if len(forks) == WORKERS and not forks & gone:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"the killed worker was not replaced within {timeout_s} s")


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if not o.ok]


def test_killed_worker_is_replaced_and_only_its_request_fails(server: Server) -> None:
    replaced_after, kills = [], 3
    with Load("127.0.0.1", server.port, TRAFFIC, concurrency=4) as load:
        for _ in range(kills):
            time.sleep(0.5)
            victim = processes(server)[1][0]
            victim.send_signal(signal.SIGKILL)
            replaced_after.append(wait_for_workers(server, {victim.pid}))
        time.sleep(0.5)
    outcomes = load.outcomes()
    failed = failures(outcomes)
    print(f"\n[worker-death] {kills} workers SIGKILLed under 4 clients: {summarize(outcomes).line()}; "
          f"replaced after {', '.join(f'{s:.2f}' for s in replaced_after)} s")
    assert len(failed) <= kills  # at most the request each victim was answering
    assert all(o.status == 500 and o.error == "InternalServerException" for o in failed)
    assert failures(outcomes[-20:]) == []


@pytest.fixture
def disposable(server: Server) -> Iterator[Server]:
    """The session server for a test that breaks it; restarted in place afterwards."""
    yield server
    restart(server)


def test_backend_process_death_is_survived_by_the_running_workers(disposable: Server) -> None:
    backend, forks = processes(disposable)
    assert backend is not None
    with Load("127.0.0.1", disposable.port, TRAFFIC, concurrency=4) as load:
        time.sleep(0.5)
        backend.send_signal(signal.SIGKILL)
        time.sleep(2.0)
    assert failures(load.outcomes()) == []
    assert all(p.is_running() for p in forks)


def test_serve_stops_when_its_workers_are_gone_for_good(disposable: Server) -> None:
    """MMS never restarts its Python backend: once it and every worker are dead, nothing can
    answer again and /ping still says 200. ``serve`` notices, says so in one line, exits 1."""
    backend, forks = processes(disposable)
    assert backend is not None
    backend.send_signal(signal.SIGKILL)
    backend.wait(10)
    for fork in forks:
        fork.send_signal(signal.SIGKILL)
    status = disposable.process.wait(30)
    assert status == 1
    assert "every model-server worker has died" in disposable.output()


@dataclass
class SessionTarget:
    """The session server as a soak target."""

    server: Server
    host: str = "127.0.0.1"
    label: str = "host (session server)"

    @property
    def port(self) -> int:
        return self.server.port

    def pids(self) -> list[int]:
        root = psutil.Process(self.server.process.pid)
        return [root.pid, *(p.pid for p in root.children(recursive=True))]

    def stop(self) -> None:
        pass  # the session fixture owns it


@pytest.mark.slow
def test_short_soak_has_no_failures_and_flat_worker_memory(server: Server) -> None:
    """20 s at concurrency 8 (``python -m reliability.soak`` runs the 10-minute one).

    The JVM's heap grows for about the first 20 s under load, so only our Python processes'
    memory is bounded here; the long soak bounds the total after its warm-up.
    """
    report = soak(SessionTarget(server), call_mix(["alice", "bob", "carol"], [f"i{i}" for i in range(6)]),
                  duration_s=20, concurrency=8, sample_s=5, warm_up_s=5)
    print(f"\n[soak-20s] {report.summary.line()}; {report.throughput_rps:.0f} calls/s; {report.memory_line()}")
    assert report.summary.failed == 0, report.summary.kinds
    assert report.growth_mb("python_pss_mb") < 20
