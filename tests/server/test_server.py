"""The real ``serve`` + multi-model-server on this host, through HTTP."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.server.harness import MAX_REQUEST_BYTES, WORKERS, Server

RECOMMENDATION_KEYS = {"item_id", "predicted_rating", "score", "rank"}
ANSWER_KEYS = {
    "user_id", "recommendations", "model_version", "fallback", "degraded", "ignored_recent_items", "as_of", "timings_ms",
}
ERROR_KEYS = {"error", "message", "request_id"}


def assert_answer(answer: dict, user_id: str, top_k: int) -> None:
    assert set(answer) == ANSWER_KEYS
    assert answer["user_id"] == user_id
    assert answer["model_version"] == "tiny-1"
    assert [r["rank"] for r in answer["recommendations"]] == list(range(1, top_k + 1))
    assert all(set(r) == RECOMMENDATION_KEYS for r in answer["recommendations"])


def test_ping_is_healthy(server: Server) -> None:
    reply = server.request("GET", "/ping")
    assert reply.status == 200
    assert reply.json() == {"status": "Healthy"}


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_single_request_has_the_documented_shape(server: Server, content_type: str) -> None:
    reply = server.invoke({"user_id": "alice", "top_k": 3}, content_type=content_type)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert_answer(reply.json(), "alice", 3)
    assert "i0" not in [r["item_id"] for r in reply.json()["recommendations"]]  # alice has seen i0


def test_batch_answers_in_request_order(server: Server) -> None:
    users = ["carol", "alice", "bob"]
    reply = server.invoke({"instances": [{"user_id": u, "top_k": 2} for u in users]})
    assert reply.status == 200, reply.body
    body = reply.json()
    assert list(body) == ["predictions"]
    for answer, user_id in zip(body["predictions"], users, strict=True):
        assert_answer(answer, user_id, 2)


def test_unknown_user_falls_back_to_popular_by_default(server: Server) -> None:
    reply = server.invoke({"user_id": "nobody", "top_k": 2})
    assert reply.status == 200
    assert reply.json()["fallback"] == "popular"


JSON = "application/json"
CLIENT_ERRORS = [
    pytest.param(b'{"user_id": ', JSON, {}, 400, "bad_request", id="malformed-json"),
    pytest.param(b'{"user_id": 5}', JSON, {}, 400, "bad_request", id="wrong-type"),
    pytest.param(b'{"user_id": "alice", "top_k": 0}', JSON, {}, 400, "bad_request", id="top-k-0"),
    pytest.param(b'{"user_id": "alice", "top_k": 101}', JSON, {}, 400, "bad_request", id="top-k-101"),
    pytest.param(b'{"user_id": "alice", "colour": "red"}', JSON, {}, 400, "bad_request", id="unknown-field"),
    pytest.param(b'{"user_id": "alice", "top_k": NaN}', JSON, {}, 400, "bad_request", id="nan-literal"),
    pytest.param(b"", JSON, {}, 400, "bad_request", id="empty-body"),
    pytest.param(b'{"user_id": "\xff\xfe"}', JSON, {}, 400, "bad_request", id="non-utf8"),
    pytest.param(b'{"user_id": "nobody", "on_unknown_user": "error"}', JSON, {}, 404, "user_not_found",
                 id="unknown-user"),
    pytest.param(json.dumps({"user_id": "a" * MAX_REQUEST_BYTES}).encode(), JSON, {}, 413, "payload_too_large",
                 id="too-large"),
    pytest.param(b'{"user_id": "alice"}', "text/plain", {}, 415, "unsupported_media_type", id="text-plain"),
    pytest.param(b'{"user_id": "alice"}', None, {}, 415, "unsupported_media_type", id="no-content-type"),
    pytest.param(b'{"user_id": "alice"}', JSON, {"Accept": "text/csv"}, 406, "not_acceptable", id="accept-csv"),
]


@pytest.mark.parametrize(("body", "content_type", "headers", "status", "error"), CLIENT_ERRORS)
def test_client_errors_are_json_with_their_status(
    server: Server, body: bytes, content_type: str | None, headers: dict[str, str], status: int, error: str
) -> None:
    reply = server.invoke(body, content_type, **headers)
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert b"Traceback" not in reply.body
    answer = reply.json()
    assert set(answer) == ERROR_KEYS and answer["error"] == error and answer["message"]
    assert answer["request_id"] == reply.headers["x-request-id"]
    assert server.invoke({"user_id": "bob"}).status == 200  # still serving


def test_unexpected_exception_is_a_generic_500_with_the_traceback_in_the_log(server: Server) -> None:
    reply = server.invoke({"user_id": "alice"}, **{"X-Twostage-Test-Raise": "1"})
    assert reply.status == 500
    answer = reply.json()
    assert answer["error"] == "internal_error" and set(answer) == ERROR_KEYS
    assert "forced failure" not in answer["message"] and b"Traceback" not in reply.body
    request_id = answer["request_id"]
    assert request_id == reply.headers["x-request-id"]
    log = _wait_for_log(server, f"request {request_id}: 500")
    line = next(line for line in log.splitlines() if f"request {request_id}: 500" in line)
    assert "ERROR" in line and "forced failure" in line
    assert "Traceback (most recent call last)" in log.split(line, 1)[1]
    assert server.invoke({"user_id": "bob"}).status == 200


def test_client_errors_are_logged_with_their_request_id_and_no_traceback(server: Server) -> None:
    request_id = server.invoke(b"[]").json()["request_id"]
    log = _wait_for_log(server, f"request {request_id}: 400")
    after = log.split(f"request {request_id}: 400", 1)[1].splitlines()[1:2]
    assert not any("Traceback" in line for line in after)


def test_each_worker_process_loads_the_model_once(server: Server) -> None:
    """TWOSTAGE_TEST_HOOKS makes a second load in one process fail, so every request would 500."""

    def one(i: int) -> int:
        return server.invoke({"user_id": ["alice", "bob", "carol"][i % 3], "top_k": 2}).status

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(one, range(200)))
    assert statuses == [200] * 200

    java = next(p for p in psutil.Process(server.process.pid).children() if "java" in p.name())
    workers = [p for p in java.children(recursive=True) if any("model_service_worker" in a for a in p.cmdline())]
    loaders = {p.pid for p in workers if p.ppid() == java.pid}
    forks = [p for p in workers if p.ppid() in loaders]
    # With preload_model, each worker process loads once, then forks one request process per
    # MMS worker thread; the forks inherit the model.
    assert len(forks) == WORKERS
    markers = sorted(server.hooks_dir.iterdir())
    assert {int(m.name.removeprefix("load-")) for m in markers} == loaders
    assert all(m.read_text().count("\n") == 1 for m in markers)


def test_model_folder_is_untouched_and_config_stays_in_the_base_dir(server: Server, tiny_model_dir: Path) -> None:
    model_dir = server.base_dir / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())
    assert all((model_dir / p.name).read_bytes() == p.read_bytes() for p in tiny_model_dir.iterdir())
    config = dict(
        line.split("=", 1) for line in (server.base_dir / ".sagemaker" / "config.properties").read_text().splitlines()
    )
    assert config["preload_model"] == "true"
    assert config["default_workers_per_model"] == str(WORKERS)
    assert config["management_address"].startswith("http://127.0.0.1:")
    assert int(config["max_request_size"]) > MAX_REQUEST_BYTES


def _wait_for_log(server: Server, needle: str, timeout_s: float = 20.0) -> str:
    """MMS logs asynchronously: poll the captured output."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        output = server.output()
        if needle in output:
            time.sleep(0.2)  # let the lines after it (a traceback) arrive too
            return server.output()
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in the server log:\n{server.output()[-3000:]}")


# --- JSON Lines (Batch Transform) and as_of ------------------------------------------------


def test_json_lines_answer_every_line_in_order_with_bad_lines_as_their_own_errors(server: Server) -> None:
    lines = [
        '{"user_id": "alice", "top_k": 2}',
        "not json",
        "",
        "[1, 2]",
        '{"user_id": "nobody", "on_unknown_user": "error"}',
        '{"user_id": "bob", "top_k": 0}',
        '{"user_id": "carol", "top_k": 3, "as_of": "1970-01-01T00:03:00Z"}',
    ]
    reply = server.invoke("\n".join(lines) + "\n", content_type="application/jsonlines")
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/jsonlines"
    answers = [json.loads(line) for line in reply.body.decode("utf-8").split("\n")]
    assert len(answers) == len(lines)
    assert_answer(answers[0], "alice", 2)
    errors = {n: answers[n - 1] for n in (2, 3, 4, 5, 6)}
    for number, answer in errors.items():
        assert set(answer) == {"error", "message", "line"} and answer["line"] == number, answer
    assert errors[2]["error"] == "bad_request" and "malformed JSON" in errors[2]["message"]
    assert "empty line" in errors[3]["message"] and "not a list" in errors[4]["message"]
    assert errors[5]["error"] == "user_not_found" and "top_k" in errors[6]["message"]
    assert_answer(answers[6], "carol", 3)
    assert answers[6]["as_of"] == 180


@pytest.mark.parametrize(
    ("content_type", "accept", "expected"),
    [
        ("application/x-jsonlines", None, "application/x-jsonlines"),
        ("application/jsonlines", "application/x-jsonlines", "application/x-jsonlines"),
        ("application/jsonlines; charset=utf-8", "*/*", "application/jsonlines"),
    ],
)
def test_json_lines_answer_in_the_json_lines_type_asked_for(
    server: Server, content_type: str, accept: str | None, expected: str
) -> None:
    headers = {} if accept is None else {"Accept": accept}
    reply = server.invoke('{"user_id": "alice"}\n{"user_id": "bob"}', content_type=content_type, **headers)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == expected
    assert [json.loads(line)["user_id"] for line in reply.body.decode().split("\n")] == ["alice", "bob"]


def test_json_lines_with_an_accept_it_cannot_serve_is_406(server: Server) -> None:
    reply = server.invoke('{"user_id": "alice"}', content_type="application/jsonlines", Accept="application/json")
    assert reply.status == 406 and reply.json()["error"] == "not_acceptable"


def test_as_of_before_a_users_interactions_hides_them(server: Server) -> None:
    # alice saw i0 at t=100: asked at t=50 she has seen nothing yet, so i0 may come back.
    now = server.invoke({"user_id": "alice", "top_k": 6}).json()
    before = server.invoke({"user_id": "alice", "top_k": 6, "as_of": 50}).json()
    assert "i0" not in [r["item_id"] for r in now["recommendations"]]
    assert "i0" in [r["item_id"] for r in before["recommendations"]] and before["as_of"] == 50
    bad = server.invoke({"user_id": "alice", "as_of": "next tuesday"})
    assert bad.status == 400 and "as_of" in bad.json()["message"]
