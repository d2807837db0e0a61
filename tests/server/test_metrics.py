"""CloudWatch EMF records through the real ``serve`` and multi-model-server.

The workers' records must reach serve's output as bare JSON lines (CloudWatch reads a log event
only when it is the JSON object alone), add up to what was sent, carry the configured namespace
and the model version, and be written both when a window's time is up and when the server stops.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.server.harness import Server, free_port, restart, stop
from tests.support.emf import assert_valid_emf
from twostage_rec.request_metrics import COUNTS, LATENCY_METRICS

NAMESPACE = "TwoStageRec/ServerTest"
MODEL_VERSION = "tiny-1"
# Answered before the test's own requests: serve's warm-up request and the harness's readiness check.
WARM_UP_REQUESTS = 2


def emf_records(output: str) -> list[dict[str, Any]]:
    """Every EMF record in ``output``; fails if one is not a bare, valid line of its own."""
    records = []
    for line in output.splitlines():
        if '"_aws"' in line:
            assert line.startswith('{"_aws":'), f"an EMF record with something in front: {line[:200]}"
            record = json.loads(line)  # the whole line, nothing after the object either
            assert_valid_emf(record)
            records.append(record)
    return records


def totals(records: list[dict[str, Any]]) -> dict[str, int]:
    requests = [r for r in records if "Breaker" not in r]
    out = {name: sum(r[name] for r in requests) for name in COUNTS}
    out["latency_values"] = sum(len(r.get("TotalLatency", [])) for r in requests)
    return out


@pytest.fixture
def disposable(server: Server) -> Iterator[Server]:
    """The session server for a test that restarts and stops it; restarted as it was afterwards."""
    yield server
    restart(server)


def test_records_reach_the_log_bare_on_time_and_at_stop(disposable: Server) -> None:
    server = disposable
    restart(server, METRICS_NAMESPACE=NAMESPACE, METRICS_WINDOW_S="1")
    assert server.invoke({"user_id": "alice"}).status == 200
    deadline = time.monotonic() + 60.0  # generous: the window is 1 s, the cores are shared
    while not emf_records(server.output()) and time.monotonic() < deadline:
        time.sleep(0.2)
    on_time = emf_records(server.output())
    assert on_time, "no record written when its window was over"

    sent = [
        server.invoke({"user_id": "bob"}),
        server.invoke({"instances": [{"user_id": "alice"}, {"user_id": "carol"}]}),
        server.invoke({"user_id": "someone-new"}),  # popular items: a fallback answer
        server.invoke(b"{not json"),  # 400
        server.invoke({"user_id": "alice"}, **{"X-Twostage-Test-Raise": "1"}),  # 500, the test hook
    ]
    assert [r.status for r in sent] == [200, 200, 200, 400, 500]
    stop(server)
    records = emf_records(server.output())
    assert len(records) > len(on_time), "the open windows were not written at stop"
    answered = WARM_UP_REQUESTS + 1 + 3
    assert totals(records) == {"Requests": answered + 2, "UsersAnswered": answered + 1, "FallbackAnswers": 1,
                               "DegradedAnswers": 0, "Errors4xx": 1, "Errors5xx": 1, "latency_values": answered}
    for record in records:
        directive = record["_aws"]["CloudWatchMetrics"][0]
        assert directive["Namespace"] == NAMESPACE and directive["Dimensions"] == [["ModelVersion"]]
        assert record["ModelVersion"] == MODEL_VERSION
        assert {d["Name"] for d in directive["Metrics"]} <= {*COUNTS, *LATENCY_METRICS.values()}


def test_an_open_breaker_is_recorded_with_its_group(disposable: Server) -> None:
    server = disposable
    nothing_listens = f"http://127.0.0.1:{free_port()}"
    restart(server, FEATURE_SOURCE="featurestore", FEATURE_GROUP_NAME="tiny-items", AWS_REGION="us-east-1",
            FEATURE_STORE_ENDPOINT_URL=nothing_listens, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
            FEATURE_STORE_BREAKER_FAILURES="1", FEATURE_STORE_BREAKER_OPEN_S="3600")
    for _ in range(4):
        reply = server.invoke({"user_id": "alice"})
        assert reply.status == 200 and reply.json()["degraded"] is True
    stop(server)
    records = emf_records(server.output())
    breakers = [r for r in records if "Breaker" in r]
    assert breakers and {r["Breaker"] for r in breakers} == {"feature-store:tiny-items"}
    assert all(r["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["ModelVersion", "Breaker"]] for r in breakers)
    assert max(r["BreakerOpen"] for r in breakers) == 1
    assert totals(records)["DegradedAnswers"] == WARM_UP_REQUESTS + 4
