"""Request metrics as CloudWatch EMF records: windows, flushes, the record's shape, breakers, threads.

Windows are driven by a fake clock with the writer thread off (records are then written by the
request that finds a window over); the thread, SIGTERM and atexit paths run for real, the last
two in a child process so that this one's signal handlers stay as they are.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.support.emf import assert_valid_emf
from twostage_rec.circuit_breaker import CircuitBreaker
from twostage_rec.recommender import FALLBACK_POPULAR, Recommendation
from twostage_rec.request_metrics import (
    COUNTS,
    LATENCY_METRICS,
    MAX_VALUES,
    MetricsWindow,
    RequestMetrics,
    emf_records,
)
from twostage_rec.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[3]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(list[str]):
    """A ``write_line`` that keeps what it is given; ``records`` decodes each line."""

    def __call__(self, line: str) -> None:
        assert "\n" not in line
        self.append(line)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self]

    def requests(self) -> list[dict[str, Any]]:
        """The request records (those without a Breaker member)."""
        return [r for r in self.records() if "Breaker" not in r]


def answer(total: float = 5.0, fallback: str | None = None, degraded: bool = False) -> Recommendation:
    timings = {"history": 0.5, "retrieval": 1.0, "features": 0.25, "ranking": 2.0, "total": total}
    return Recommendation("u", [], fallback, degraded, timings)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def metrics(clock: FakeClock, lines: Lines, window_s: float = 10.0, **kwargs: Any) -> RequestMetrics:
    return RequestMetrics("TwoStageRec", "v7", window_s, write_line=lines, timer=False, clock=clock,
                          wall_clock=lambda: 1_700_000_000.25, **kwargs)


def test_a_window_adds_up_its_requests_and_is_written_by_the_first_request_after_it(clock: FakeClock) -> None:
    lines = Lines()
    m = metrics(clock, lines)
    m.record_answers([answer(4.0)])
    m.record_answers([answer(6.0, fallback=FALLBACK_POPULAR), answer(6.0, degraded=True)])  # a batch of two
    m.record_error(400)
    m.record_error(413)
    m.record_error(503)
    clock.now += 9.99
    m.record_answers([answer(8.0)])
    assert lines == []  # the window is not over yet: nothing written per request
    clock.now += 0.01
    m.record_answers([answer(9.0)])  # opens the next window and writes the one before
    [record] = lines.records()
    assert_valid_emf(record)
    assert {k: record[k] for k in COUNTS} == {"Requests": 6, "UsersAnswered": 4, "FallbackAnswers": 1,
                                              "DegradedAnswers": 1, "Errors4xx": 2, "Errors5xx": 1}
    assert record["TotalLatency"] == [4.0, 6.0, 8.0]  # one value per answered request, not per user
    assert record["RankingLatency"] == [2.0, 2.0, 2.0]
    assert record["ModelVersion"] == "v7"
    assert record["_aws"]["Timestamp"] == 1_700_000_000_250  # the window's start, in ms
    directive = record["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "TwoStageRec" and directive["Dimensions"] == [["ModelVersion"]]
    units = {d["Name"]: d["Unit"] for d in directive["Metrics"]}
    assert units == {**dict.fromkeys(COUNTS, "Count"), **dict.fromkeys(LATENCY_METRICS.values(), "Milliseconds")}
    m.flush()
    assert lines.requests()[-1]["TotalLatency"] == [9.0] and lines.requests()[-1]["Requests"] == 1


def test_a_window_of_errors_only_defines_no_latency_metric(clock: FakeClock) -> None:
    lines = Lines()
    m = metrics(clock, lines)
    m.record_error(500)
    m.flush()
    [record] = lines.records()
    assert_valid_emf(record)
    assert record["Errors5xx"] == 1 and record["Requests"] == 1
    names = {d["Name"] for d in record["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert names == set(COUNTS)  # a metric with no value must not be defined


def test_a_window_closes_at_the_specifications_100_values(clock: FakeClock) -> None:
    lines = Lines()
    m = metrics(clock, lines)
    for i in range(MAX_VALUES + 1):
        m.record_answers([answer(float(i))])
    [full] = lines.records()
    assert full["Requests"] == MAX_VALUES and full["TotalLatency"] == [float(i) for i in range(MAX_VALUES)]
    assert_valid_emf(full)
    m.flush()
    assert lines.records()[-1]["TotalLatency"] == [float(MAX_VALUES)]


def test_flush_and_close_write_the_open_window_once(clock: FakeClock) -> None:
    lines = Lines()
    m = metrics(clock, lines)
    m.flush()
    assert lines == []  # nothing recorded: nothing written
    m.record_answers([answer()])
    m.close()
    m.flush()
    m.close()
    assert [r["Requests"] for r in lines.records()] == [1]


def test_disabled_metrics_write_nothing(clock: FakeClock) -> None:
    lines = Lines()
    m = metrics(clock, lines, enabled=False)
    m.record_answers([answer()])
    m.record_error(500)
    m.close()
    assert lines == []


def test_breaker_records_say_whether_each_breaker_was_open_in_the_window(clock: FakeClock) -> None:
    items = CircuitBreaker("feature-store:items", 1, 60.0, clock=clock)
    history = CircuitBreaker("feature-store:history", 1, 60.0, clock=clock)
    lines = Lines()
    m = metrics(clock, lines, breakers=[items, history])
    m.record_answers([answer()])
    m.flush()
    items.record_failure()  # opens
    m.record_answers([answer(degraded=True)])
    m.record_error(503)
    m.flush()
    breakers = [(r["Breaker"], r["BreakerOpen"]) for r in lines.records() if "Breaker" in r]
    assert breakers == [("feature-store:items", 0), ("feature-store:history", 0),
                        ("feature-store:items", 1), ("feature-store:history", 0)]
    for record in lines.records():
        assert_valid_emf(record)
        if "Breaker" in record:
            directive = record["_aws"]["CloudWatchMetrics"][0]
            assert directive["Dimensions"] == [["ModelVersion", "Breaker"]]
            assert directive["Metrics"] == [{"Name": "BreakerOpen", "Unit": "None"}]
            assert record["ModelVersion"] == "v7"


def test_an_open_breaker_counts_even_if_it_closed_before_the_window_ends(clock: FakeClock) -> None:
    breaker = CircuitBreaker("feature-store:items", 1, 1.0, clock=clock)
    lines = Lines()
    m = metrics(clock, lines, breakers=[breaker])
    breaker.record_failure()
    m.record_answers([answer()])
    clock.now += 1.0
    assert breaker.allow()  # the probe
    breaker.record_success()  # closed again
    m.record_answers([answer()])
    m.flush()
    assert [r["BreakerOpen"] for r in lines.records() if "Breaker" in r] == [1]


def test_emf_records_validate() -> None:
    window = MetricsWindow(started=1.5, ends=10.0)
    window.counts["Requests"] = 1
    window.latencies_ms["total"].append(1.0)
    window.breakers_open["b"] = 0
    records = emf_records(window, "NS", "v1")
    for record in records:
        assert_valid_emf(record)
    assert [r["_aws"]["Timestamp"] for r in records] == [1500, 1500]
    assert "HistoryLatency" not in records[0] and records[0]["TotalLatency"] == [1.0]
    with pytest.raises(jsonschema.ValidationError):  # the check itself can fail
        assert_valid_emf({**records[0], "_aws": {"CloudWatchMetrics": records[0]["_aws"]["CloudWatchMetrics"]}})


def test_the_writer_thread_closes_a_window_when_its_time_is_up() -> None:
    lines = Lines()
    m = RequestMetrics("TwoStageRec", "v7", 0.05, write_line=lines)
    m.record_answers([answer()])
    deadline = time.monotonic() + 10.0  # generous: shared cores; no timing is asserted
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r["Requests"] for r in lines.records()] == [1]  # no second request, no flush
    m.close()
    assert len(lines) == 1


def test_records_from_many_threads_are_all_counted_once() -> None:
    lines = Lines()
    breaker = CircuitBreaker("feature-store:items", 3, 0.001)
    m = RequestMetrics("TwoStageRec", "v7", 0.002, breakers=[breaker], write_line=lines)
    threads, per_thread = 4, 500

    def work(seed: int) -> None:
        for i in range(per_thread):
            if i % 10 == seed:
                m.record_error(500)
            else:
                m.record_answers([answer(float(i)), answer(float(i))])
            if i % 50 == 0:
                breaker.record_failure()  # other threads change breaker state meanwhile

    workers = [threading.Thread(target=work, args=(seed,)) for seed in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    m.close()
    requests = lines.requests()
    assert sum(r["Requests"] for r in requests) == threads * per_thread
    errors = threads * per_thread // 10
    assert sum(r["Errors5xx"] for r in requests) == errors
    assert sum(r["UsersAnswered"] for r in requests) == 2 * (threads * per_thread - errors)
    assert sum(len(r.get("TotalLatency", [])) for r in requests) == threads * per_thread - errors
    for record in lines.records():
        assert_valid_emf(record)


@pytest.mark.parametrize(
    ("env", "message"),
    [({"METRICS_NAMESPACE": "AWS/SageMaker"}, "METRICS_NAMESPACE"),
     ({"METRICS_NAMESPACE": "two\nlines"}, "METRICS_NAMESPACE"),
     ({"METRICS_NAMESPACE": "   "}, "METRICS_NAMESPACE"),
     ({"METRICS_NAMESPACE": "x" * 256}, "METRICS_NAMESPACE"),
     ({"METRICS_WINDOW_S": "11"}, "METRICS_WINDOW_S"),
     ({"METRICS_WINDOW_S": "0"}, "METRICS_WINDOW_S"),
     ({"METRICS_ENABLED": "maybe"}, "METRICS_ENABLED")],
)
def test_settings_reject_bad_metrics_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_settings_read_the_metrics_variables() -> None:
    assert (Settings.from_env({}).metrics_enabled, Settings.from_env({}).metrics_namespace,
            Settings.from_env({}).metrics_window_s) == (True, "TwoStageRec", 10.0)
    s = Settings.from_env({"METRICS_ENABLED": "false", "METRICS_NAMESPACE": "Rec/Prod: eu-west-1",
                           "METRICS_WINDOW_S": "2.5"})
    assert (s.metrics_enabled, s.metrics_namespace, s.metrics_window_s) == (False, "Rec/Prod: eu-west-1", 2.5)


# A child process stands for a model-server worker: a request loop in the main thread, the
# model server's own SIGTERM handler installed before the first request, metrics on stdout.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from twostage_rec.recommender import Recommendation
    from twostage_rec.request_metrics import RequestMetrics

    mode = sys.argv[1]
    timings = {"history": 0.5, "retrieval": 1.0, "features": 0.25, "ranking": 2.0, "total": 5.0}
    metrics = RequestMetrics("TwoStageRec", "v7", 10.0, hook_process_stop=True)
    if mode == "fork":  # made before a fork, as the model is loaded in MMS's backend process
        pid = os.fork()
        if pid:
            metrics.record_answers([Recommendation("parent", [], None, False, timings)])
            os.waitpid(pid, 0)
            sys.exit(0)  # the parent's own record is written at its exit
    signal.signal(signal.SIGTERM, lambda signo, frame: print("previous handler ran", file=sys.stderr, flush=True))
    for _ in range(3):
        metrics.record_answers([Recommendation("u", [], None, False, timings)])
    if mode == "exit":
        sys.exit(0)
    os.kill(os.getpid(), signal.SIGTERM)
    print("after SIGTERM", file=sys.stderr, flush=True)
    os._exit(0)  # as a multiprocessing child leaves: no atexit
""")


def run_child(mode: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "code"), str(REPO)])}
    return subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True,
                          timeout=120, check=True)


def child_requests(stdout: str) -> list[int]:
    records = [json.loads(line) for line in stdout.splitlines()]
    for record in records:
        assert_valid_emf(record)
    return [r["Requests"] for r in records]


def test_sigterm_writes_the_open_window_then_runs_the_handler_already_installed() -> None:
    result = run_child("sigterm")
    assert child_requests(result.stdout) == [3]  # written before os._exit, which skips atexit
    assert result.stderr.splitlines() == ["previous handler ran", "after SIGTERM"]


def test_a_normal_exit_writes_the_open_window() -> None:
    assert child_requests(run_child("exit").stdout) == [3]


def test_a_forked_process_writes_only_its_own_requests() -> None:
    result = run_child("fork")
    assert sorted(child_requests(result.stdout)) == [1, 3]  # the child's 3 on SIGTERM, the parent's 1 at exit
    assert "previous handler ran" in result.stderr


@pytest.fixture
def default_sigterm() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_without_the_hook_no_signal_handler_is_installed(default_sigterm: None) -> None:
    before = signal.getsignal(signal.SIGTERM)
    m = RequestMetrics("TwoStageRec", "v7", 10.0, write_line=Lines())
    m.record_answers([answer()])
    m.close()
    assert signal.getsignal(signal.SIGTERM) is before
