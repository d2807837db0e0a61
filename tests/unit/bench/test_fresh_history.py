"""The fresh-history and event-recording benchmarks' parsing and reporting (no Docker, no timing asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import event_writes, fresh_history, report, suite
from bench.__main__ import SECTIONS
from bench.fresh_history import BreakerChange, Sent, breaker_changes, recovery
from bench.served import Reply, load_summary

EVENTS_BENCH_OUTPUT = """\
endpoint http://127.0.0.1:42693; 8 writer processes, 10000 users, 1000 events/s offered for 20 s
recorded 20000 of 20000 events in 20.4 s: 980 events/s; 20311 puts, 311 lost versions merged and retried, \
0 users failed
CPU per event: 2.34 ms in the writers + 0.66 ms in the server = 3.00 ms (2 idle cores would sustain about \
667 events/s)
event latency (offer -> confirmed write): p50 13.49 ms  p99 163.70 ms  (20000 events)
merge-write call (mean 93.8 events each): p50 27.80 ms  p99 67.03 ms  (213 calls)
counted back: 20000 of 20000; lost 0
FeatureStoreHistorySource.get, 1 user(s): p50 2.76 ms  p99 4.40 ms  (300 calls)
FeatureStoreHistorySource.get, 100 user(s): p50 19.85 ms  p99 37.64 ms  (300 calls)
"""

GROUP = "ml-100k-user-history"


def test_events_bench_output_is_parsed() -> None:
    figures = event_writes.parse(EVENTS_BENCH_OUTPUT)
    assert figures["setup"] == {"writers": 8, "users": 10000, "offered_rate": 1000, "seconds": 20}
    assert figures["recorded"] == {"stored": 20000, "offered": 20000, "elapsed_s": 20.4, "achieved_rate": 980,
                                   "puts": 20311, "conflicts": 311, "failed_users": 0}
    assert figures["cpu"] == {"writer_ms": 2.34, "server_ms": 0.66, "total_ms": 3.0, "cores": 2,
                              "sustainable_rate": 667}
    assert figures["event_latency"] == {"p50": 13.49, "p99": 163.7, "n": 20000}
    assert figures["merge_write"]["events_per_call"] == 93.8
    assert figures["counted"] == {"found": 20000, "offered": 20000, "lost": 0}
    assert figures["read_100"] == {"p50": 19.85, "p99": 37.64, "n": 300}


def test_events_bench_output_without_its_own_server_has_no_cpu_line() -> None:
    text = "\n".join(line for line in EVENTS_BENCH_OUTPUT.splitlines() if not line.startswith("CPU"))
    assert "cpu" not in event_writes.parse(text)


def test_events_bench_output_missing_a_line_is_refused() -> None:
    text = "\n".join(line for line in EVENTS_BENCH_OUTPUT.splitlines() if not line.startswith("counted back"))
    with pytest.raises(ValueError, match="'counted'"):
        event_writes.parse(text)


def _log_line(stamp: str, pid: int, change: str, group: str = GROUP) -> str:
    """A line of ``docker logs --timestamps`` as multi-model-server forwards a worker's stderr."""
    return (f"{stamp} 2026-12-01T11:20:33,120 [WARN ] W-9000-model-stderr com.amazonaws.ml.mms.wlm.WorkerLifeCycle "
            f"- WARNING twostage_rec.circuit_breaker pid={pid}: circuit breaker feature-store:{group}: {change} "
            "after 5 consecutive failures; calls refused for 1 s")


def test_breaker_changes_from_the_container_log() -> None:
    log = "\n".join([
        "2026-12-01T11:20:30.000000000Z some other line",
        _log_line("2026-12-01T11:20:33.123456789Z", 50, "closed -> open"),
        _log_line("2026-12-01T11:20:33.500000000Z", 53, "closed -> open", group="items"),
        _log_line("2026-12-01T11:20:34.25Z", 53, "open -> half-open"),
        _log_line("2026-12-01T11:20:35Z", 53, "half-open -> closed"),
    ])
    changes = breaker_changes(log, GROUP)
    assert [(c.pid, c.change) for c in changes] == [(50, "closed -> open"), (53, "open -> half-open"),
                                                    (53, "half-open -> closed")]
    base = changes[0].at
    assert base == pytest.approx(1_796_124_033.123456, abs=1e-6)  # nanoseconds cut to microseconds
    assert [c.at - base for c in changes] == pytest.approx([0.0, 1.126544, 1.876544], abs=1e-6)


def _sent(at: float, degraded: bool | None) -> Sent:
    """A request sent at ``at``; ``degraded`` None: the connection broke."""
    if degraded is None:
        return Sent(at, None)
    return Sent(at, Reply(200, 2.0, {"degraded": degraded, "timings_ms": {"total": 1.0, "history": 0.1}}))


def test_recovery_counts_from_the_store_coming_back() -> None:
    back = 100.0
    after = [_sent(100.01, True), _sent(100.02, None), _sent(100.4, False), _sent(100.5, True), _sent(100.6, False)]
    log = [
        BreakerChange(99.0, 50, "closed -> open"),  # before the store was back: not a probe of the recovery
        BreakerChange(100.05, 50, "half-open -> open"),  # a probe sent before the store was back, failing after
        BreakerChange(100.39, 50, "open -> half-open"),
        BreakerChange(100.4, 50, "half-open -> closed"),
        BreakerChange(100.45, 53, "open -> half-open"),
        BreakerChange(100.5, 53, "half-open -> open"),  # the first probe after the store was back failed
        BreakerChange(101.5, 53, "open -> half-open"),
        BreakerChange(101.5, 53, "half-open -> closed"),
    ]
    result = recovery(after, log, back)
    assert result["requests"] == 3 and result["seconds"] == pytest.approx(0.402)  # sent at +0.4 s, 2 ms answer
    assert result["last_degraded_request"] == 4 and result["last_degraded_s"] == pytest.approx(0.502)
    assert result["first_probe_closed"] == {50: True, 53: False}


def test_recovery_without_a_good_answer() -> None:
    result = recovery([_sent(1.0, True)], [BreakerChange(1.0, 7, "half-open -> open")], back=0.5)
    assert result["requests"] is None and result["seconds"] is None
    assert result["first_probe_closed"] == {7: None}


def test_load_summary_reads_single_and_batch_answers() -> None:
    single = Reply(200, 3.0, {"degraded": False, "timings_ms": {"total": 2.0, "history": 0.5}})
    batch = Reply(200, 30.0, {"predictions": [{"degraded": True, "timings_ms": {"total": 20.0, "history": 5.0}}]})
    failed = Reply(503, 1.0, None)
    summary = load_summary([single, batch, failed])
    assert (summary["requests"], summary["errors"], summary["degraded"]) == (3, 1, 1)
    assert summary["handler_ms"]["max"] == 20.0 and summary["history_ms"]["p50"] == 2.75
    assert load_summary([failed])["handler_ms"] is None


def test_stderr_to_hands_the_file_to_a_child(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "child.log"
    with fresh_history.stderr_to(log):
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stderr.write('from the child')"])
    child.wait()
    assert log.read_text() == "from the child"


def test_every_section_has_a_plan() -> None:
    assert set(SECTIONS) == set(suite.SECTIONS)


def _latency(p50: float, p99: float) -> dict[str, float]:
    return {"n": 1000, "p50": p50, "p90": p99, "p99": p99, "mean": p50, "max": p99}


def _summary(p50: float, p99: float, requests: int = 1000, degraded: int = 0) -> dict[str, Any]:
    return {"requests": requests, "errors": 0, "latency_ms": _latency(p50, p99), "handler_ms": _latency(1.0, 2.0),
            "history_ms": _latency(0.5, 1.0), "degraded": degraded}


def _outage(open_p50: float, first_probe: dict[str, bool | None]) -> dict[str, Any]:
    return {"healthy": _summary(4.0, 9.0), "trip": {"requests": 12, "seconds": 1.1, "workers_opened": 2},
            "open": {**_summary(open_p50, 12.0, degraded=1000), "probes": 6}, "restore_s": 0.8,
            "recovery": {"requests": 40, "seconds": 0.62, "last_degraded_request": 55, "last_degraded_s": 0.9,
                         "first_probe_closed": first_probe}}


def _fresh_history() -> dict[str, Any]:
    rounds = [{"user_id": str(u), "item_id": "50", "command_s": 1.9, "requests": 1, "ms_after_return": 4.0 + u,
               "degraded": False} for u in range(4)]
    return {
        "model": "ml-100k-x", "n_users": 943, "workers": 2, "seed_s": 3.2,
        "settings": {"deadline_ms": 200.0, "breaker_failures": 5, "breaker_open_s": 1.0, "hang_ms": 5000.0,
                     "batch": 100},
        "latency": {"single": {"without": _summary(2.0, 5.0), "with": _summary(4.5, 9.0)},
                    "batch": {"without": _summary(30.0, 40.0, 200), "with": _summary(45.0, 60.0, 200)}},
        "calls": {"single": {"invocations": 2000, "batch_get_record": 2000},
                  "batch": {"invocations": 200, "batch_get_record": 200}},
        "freshness": rounds,
        "outages": {"refused": _outage(3.0, {"50": True, "53": True}), "hang": _outage(9.0, {"50": True, "53": None})},
    }


def _results() -> dict[str, Any]:
    return {
        "command": "python -m bench --only fresh-history", "started_at": "2026-12-01T00:00:00+00:00",
        "duration_s": 300.0, "json": "bench-results/x.json", "load_before": [5.0, 4.0, 3.0],
        "load_after": [6.0, 4.0, 3.0],
        "machine": {"cpu": "Test CPU", "cores": 2, "ram_gib": 24.0, "commit": "abc123", "dirty": True,
                    "python": "3.11", "numpy": "2", "xgboost": "3", "omp_num_threads": "1"},
        "fresh_history": _fresh_history(),
        "event_writes": {"command": "python -m local_test.feature_store.events_bench --seconds 20", "exit_status": 0,
                         **event_writes.parse(EVENTS_BENCH_OUTPUT)},
        "notes": [],
    }


def _verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["target"].split(":")[0].split(" (")[0]: t for t in report.targets(results)}


def test_fresh_history_targets() -> None:
    by_name = _verdicts(_results())
    added = by_name["User-history read in the container, one user"]
    assert added["met"] is True  # +2.5 ms
    assert added["measured"] == ("4.50 / 9.00 ms with vs 2.00 / 5.00 ms without (p50 / p99) (+2.50 ms; the "
                                 "worker's history stage 0.50 vs 0.50 ms)")
    batch = by_name["User-history read, batch of 100 users"]
    assert batch["met"] is True and batch["measured"].startswith("200 calls for 200 batch invocations; 45.00 / 60.00")
    fresh = by_name["An event recorded with `python -m training events put` changes the very next answer"]
    assert fresh["met"] is True
    assert fresh["measured"] == ("4 of 4 rounds on the first request (0 needed more); that answer 6.00 ms (median) "
                                 "after the command returned")
    refused = by_name["Feature Store refusing connections"]
    assert refused["met"] is True and "(p50 / p99; 0.75x)" in refused["measured"]
    assert by_name["Feature Store hanging"]["met"] is False  # 9.0 / 4.0 = 2.25x
    recovered = by_name["Recovery on the first probe after the store returns"]
    assert recovered["met"] is True  # the hang's worker 53 showed no probe of its own: not counted against
    assert "refused: first good answer 0.62 s (40 requests) after it was back, 2 of 2 workers" in recovered["measured"]
    assert "hang: first good answer 0.62 s (40 requests) after it was back, 1 of 2 workers" in recovered["measured"]
    assert by_name["1,000 events/s for 10,000 users by 8 concurrent writers"]["met"] is True
    rate = by_name["1,000 events/s recorded for 10,000 users by 8 concurrent writers"]
    assert rate["met"] is True  # 980 >= 950
    assert rate["measured"] == ("980 events/s (20,000 events in 20.4 s); CPU 3.00 ms per event (writers + server): "
                                "2 idle cores would sustain about 667 events/s")


def test_fresh_history_targets_not_met() -> None:
    results = _results()
    f = results["fresh_history"]
    f["latency"]["single"]["with"] = _summary(7.5, 12.0)
    f["calls"]["batch"]["batch_get_record"] = 201
    f["freshness"][2]["requests"] = 2
    f["outages"]["refused"]["recovery"]["first_probe_closed"] = {"50": True, "53": False}
    results["event_writes"]["counted"]["lost"] = 1
    results["event_writes"]["recorded"]["achieved_rate"] = 159
    by_name = _verdicts(results)
    for name in ("User-history read in the container, one user", "User-history read, batch of 100 users",
                 "An event recorded with `python -m training events put` changes the very next answer",
                 "Recovery on the first probe after the store returns",
                 "1,000 events/s for 10,000 users by 8 concurrent writers",
                 "1,000 events/s recorded for 10,000 users by 8 concurrent writers"):
        assert by_name[name]["met"] is False, name
    assert "3 of 4 rounds on the first request (1 needed more)" in by_name[
        "An event recorded with `python -m training events put` changes the very next answer"]["measured"]


def test_fresh_history_targets_not_measured() -> None:
    results = _results()
    del results["fresh_history"], results["event_writes"]
    verdicts = report.targets(results)
    assert len(verdicts) == len(report.targets(_results()))
    assert all(t["met"] is None for t in verdicts)


def test_fresh_history_sections_render() -> None:
    results = _results()
    results["targets"] = report.targets(results)
    text = report.markdown(results)
    expected = [
        "## Fresh history: the user-history group through the container (ml-100k-x)",
        "`FEATURE_STORE_BREAKER_OPEN_S=1`",
        "| one user | 1000 | 2.00 / 5.00 | 4.50 / 9.00 | +2.50 | 0.50 / 1.00 | 0.50 / 1.00 | 2000 / 2000 | 0 |",
        "| batch of 100 users | 200 | 30.00 / 40.00 | 45.00 / 60.00 | +15.00 |",
        "| 3 | 50 | 1.90 | 1 | 7.00 | False |",
        "| refused | 4.00 / 9.00 | 3.00 / 12.00 | 0.75x | 1000 (6 probes, 1000 degraded) | 12 in 1.10 s (2 workers) "
        "| request 40, 0.62 s | request 55, 0.90 s | 2 of 2 |",
        "## Recording events into the user-history group",
        "| counted back | 20,000 of 20,000; lost 0 |",
        "| CPU per event: writers + server | 2.34 + 0.66 = 3.00 ms (2 idle cores would sustain about 667 events/s) |",
    ]
    assert [line for line in expected if line not in text] == []
    table_rows = [line for line in text.splitlines() if line.startswith("|")]
    assert all(line.endswith("|") for line in table_rows)
