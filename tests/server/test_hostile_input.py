"""Hostile input over HTTP against the real ``serve``: every client error is a 4xx with a JSON body
``{error, message, request_id}``, never a 5xx or a traceback, and the server keeps serving.

The session server has ``MAX_REQUEST_BYTES=4096`` (harness), so size limits are hit with small
bodies. A body beyond multi-model-server's own limit (MAX_REQUEST_BYTES + 1 MiB) never reaches our
handler: MMS answers a bare 413 (see RELIABILITY.md). Also here: the whole request path fuzzed
in-process, and the no-pickle guarantees of the code and the artifact.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from reliability.audit import find_pickle_uses
from tests.server.harness import MAX_REQUEST_BYTES, Reply, Server
from twostage_rec.content_types import JSON
from twostage_rec.errors import RecommenderError
from twostage_rec.handler import RawRequest, load_service, output_fn, predict_fn

REPO = Path(__file__).resolve().parents[2]
ERROR_KEYS = {"error", "message", "request_id"}
USERS = ["alice", "bob", "carol"]
ITEMS = [f"i{i}" for i in range(6)]


def assert_json_error(reply: Reply, status: int, error: str | None = None) -> None:
    assert reply.status == status, reply.body[:300]
    assert reply.headers["content-type"] == JSON
    assert b"Traceback" not in reply.body and b'File "' not in reply.body
    body = reply.json()
    assert set(body) == ERROR_KEYS and body["message"], body
    assert body["request_id"] == reply.headers["x-request-id"]
    if error is not None:
        assert body["error"] == error, body


def assert_still_serving(server: Server) -> None:
    reply = server.invoke({"user_id": "bob", "top_k": 2})
    assert reply.status == 200, reply.body[:300]
    assert [r["rank"] for r in reply.json()["recommendations"]] == [1, 2]


def assert_answer(reply: Reply, user_ids: list[str]) -> None:
    """A 200 whose answers are in request order, each a well-formed list."""
    assert reply.status == 200, reply.body[:300]
    body = reply.json()
    answers = body["predictions"] if "predictions" in body else [body]
    assert [a["user_id"] for a in answers] == user_ids
    for answer in answers:
        assert [r["rank"] for r in answer["recommendations"]] == list(range(1, len(answer["recommendations"]) + 1))


def body_of(size: int) -> bytes:
    return json.dumps({"user_id": "a" * size}).encode()


BAD_REQUEST, TOO_LARGE = "bad_request", "payload_too_large"
HOSTILE = [
    # malformed JSON
    pytest.param(b'{"user_id": "alice"', JSON, {}, 400, BAD_REQUEST, id="truncated-json"),
    pytest.param(b'{"user_id": "alice"} trailing', JSON, {}, 400, BAD_REQUEST, id="trailing-garbage"),
    pytest.param(b"{'user_id': 'alice'}", JSON, {}, 400, BAD_REQUEST, id="single-quotes"),
    pytest.param(b"", JSON, {}, 400, BAD_REQUEST, id="empty-body"),
    pytest.param(b" \n\t ", JSON, {}, 400, BAD_REQUEST, id="whitespace-body"),
    pytest.param(b"null", JSON, {}, 400, BAD_REQUEST, id="null-body"),
    pytest.param(b'"alice"', JSON, {}, 400, BAD_REQUEST, id="string-body"),
    pytest.param(b"[" * 2000 + b"]" * 2000, JSON, {}, 400, BAD_REQUEST, id="nested-2000-deep"),
    # NaN / Infinity literals (Python's json accepts them; JSON does not)
    pytest.param(b'{"user_id": "alice", "top_k": NaN}', JSON, {}, 400, BAD_REQUEST, id="nan"),
    pytest.param(b'{"user_id": "alice", "top_k": Infinity}', JSON, {}, 400, BAD_REQUEST, id="infinity"),
    pytest.param(b'{"user_id": "alice", "filters": {"max_price": -Infinity}}', JSON, {}, 400, BAD_REQUEST,
                 id="minus-infinity"),
    pytest.param(b'{"user_id": "alice", "filters": {"max_price": 1e999}}', JSON, {}, 400, BAD_REQUEST,
                 id="float-overflow"),
    # bytes that are not UTF-8
    pytest.param(b'{"user_id": "\xff\xfe"}', JSON, {}, 400, BAD_REQUEST, id="invalid-utf8"),
    pytest.param('{"user_id": "alice"}'.encode("utf-16"), JSON, {}, 400, BAD_REQUEST, id="utf16"),
    pytest.param(b'\xef\xbb\xbf{"user_id": "alice"}', JSON, {}, 400, BAD_REQUEST, id="utf8-bom"),
    pytest.param(b'{"user_id": "\\ud800"}', JSON, {}, 400, BAD_REQUEST, id="lone-surrogate"),
    # wrong types
    pytest.param(b'{"user_id": 42}', JSON, {}, 400, BAD_REQUEST, id="user-id-number"),
    pytest.param(b'{"user_id": ["alice"]}', JSON, {}, 400, BAD_REQUEST, id="user-id-list"),
    pytest.param(b'{"user_id": null}', JSON, {}, 400, BAD_REQUEST, id="user-id-null"),
    pytest.param(b'{"user_id": ""}', JSON, {}, 400, BAD_REQUEST, id="user-id-empty"),
    pytest.param(b'{"user_id": "alice", "top_k": "5"}', JSON, {}, 400, BAD_REQUEST, id="top-k-string"),
    pytest.param(b'{"user_id": "alice", "top_k": 2.5}', JSON, {}, 400, BAD_REQUEST, id="top-k-float"),
    pytest.param(b'{"user_id": "alice", "top_k": true}', JSON, {}, 400, BAD_REQUEST, id="top-k-bool"),
    pytest.param(b'{"user_id": "alice", "exclude_items": "i1"}', JSON, {}, 400, BAD_REQUEST, id="exclude-string"),
    pytest.param(b'{"user_id": "alice", "exclude_items": [1]}', JSON, {}, 400, BAD_REQUEST, id="exclude-numbers"),
    pytest.param(b'{"user_id": "alice", "filters": []}', JSON, {}, 400, BAD_REQUEST, id="filters-list"),
    pytest.param(b'{"user_id": "alice", "filters": {"min_price": "1"}}', JSON, {}, 400, BAD_REQUEST,
                 id="price-string"),
    pytest.param(b'{"user_id": "alice", "on_unknown_user": "maybe"}', JSON, {}, 400, BAD_REQUEST, id="bad-policy"),
    pytest.param(b'{"instances": {"user_id": "alice"}}', JSON, {}, 400, BAD_REQUEST, id="instances-object"),
    pytest.param(b'{"instances": [5]}', JSON, {}, 400, BAD_REQUEST, id="instance-number"),
    pytest.param(b'{"instances": []}', JSON, {}, 400, BAD_REQUEST, id="instances-empty"),
    # zero, negative, huge top_k
    pytest.param(b'{"user_id": "alice", "top_k": 0}', JSON, {}, 400, BAD_REQUEST, id="top-k-zero"),
    pytest.param(b'{"user_id": "alice", "top_k": -1}', JSON, {}, 400, BAD_REQUEST, id="top-k-negative"),
    pytest.param(b'{"user_id": "alice", "top_k": 1' + b"0" * 3000 + b"}", JSON, {}, 400, BAD_REQUEST,
                 id="top-k-3000-digits"),
    pytest.param(b'{"user_id": "alice", "top_k": 5, "num_candidates": 4}', JSON, {}, 400, BAD_REQUEST,
                 id="candidates-below-top-k"),
    pytest.param(b'{"user_id": "alice", "num_candidates": 1000000}', JSON, {}, 400, BAD_REQUEST,
                 id="candidates-huge"),
    # unknown fields
    pytest.param(b'{"user_id": "alice", "admin": true}', JSON, {}, 400, BAD_REQUEST, id="unknown-field"),
    pytest.param(b'{"user_id": "alice", "filters": {"where": "1=1"}}', JSON, {}, 400, BAD_REQUEST,
                 id="unknown-filter"),
    pytest.param(b'{"instances": [{"user_id": "alice"}], "top_k": 3}', JSON, {}, 400, BAD_REQUEST,
                 id="field-next-to-instances"),
    # huge arrays and batches
    pytest.param(b'{"user_id": "a", "exclude_items": [' + b",".join([b'""'] * 1001) + b"]}", JSON, {}, 400,
                 BAD_REQUEST, id="exclude-1001-entries"),
    pytest.param(json.dumps({"instances": [{"user_id": "a"}] * 101}).encode(), JSON, {}, 400, BAD_REQUEST,
                 id="batch-over-limit"),
    pytest.param(json.dumps({"user_id": "alice", "exclude_items": ITEMS * 200}).encode(), JSON, {}, 413, TOO_LARGE,
                 id="huge-array"),
    pytest.param(body_of(MAX_REQUEST_BYTES), JSON, {}, 413, TOO_LARGE, id="just-over-the-limit"),
    pytest.param(body_of(1_000_000), JSON, {}, 413, TOO_LARGE, id="1-MB"),
    # content type and accept
    pytest.param(b'{"user_id": "alice"}', None, {}, 415, "unsupported_media_type", id="no-content-type"),
    pytest.param(b'{"user_id": "alice"}', "text/plain", {}, 415, "unsupported_media_type", id="text-plain"),
    pytest.param(b"user_id=alice", "application/x-www-form-urlencoded", {}, 415, "unsupported_media_type",
                 id="form-urlencoded"),
    pytest.param(b'{"user_id": "alice"}', "application/jsonx", {}, 415, "unsupported_media_type", id="json-prefix"),
    pytest.param(b'{"user_id": "alice"}', "application/json; charset=latin-1", {}, 415, "unsupported_media_type",
                 id="latin1-charset"),
    pytest.param(b'{"user_id": "alice"}', "application/x-npy", {}, 415, "unsupported_media_type", id="npy"),
    pytest.param(b'{"user_id": "alice"}', JSON, {"Accept": "text/csv"}, 406, "not_acceptable", id="accept-csv"),
    pytest.param(b'{"user_id": "alice"}', JSON, {"Accept": "application/json;q=0"}, 406, "not_acceptable",
                 id="accept-json-q0"),
    pytest.param(b'{"user_id": "alice"}', JSON, {"Accept": "text/html, image/png"}, 406, "not_acceptable",
                 id="accept-html"),
    # the unknown-user policy asked to raise
    pytest.param(b'{"user_id": "nobody", "on_unknown_user": "error"}', JSON, {}, 404, "user_not_found",
                 id="unknown-user-error"),
]


@pytest.mark.parametrize(("body", "content_type", "headers", "status", "error"), HOSTILE)
def test_hostile_request_gets_its_4xx_as_json_and_the_server_keeps_serving(
    server: Server, body: bytes, content_type: str | None, headers: dict[str, str], status: int, error: str
) -> None:
    assert_json_error(server.invoke(body, content_type, **headers), status, error)
    assert_still_serving(server)


@pytest.mark.parametrize(
    ("payload", "user_ids"),
    [
        pytest.param({"user_id": "ユーザー🙂"}, ["ユーザー🙂"], id="unicode-unknown-user"),
        pytest.param({"user_id": "\u202eevil\u202c"}, ["\u202eevil\u202c"], id="bidi-override"),
        pytest.param({"user_id": "a\u0000b"}, ["a\u0000b"], id="nul-in-id"),
        pytest.param({"user_id": "e\u0301" * 100}, ["e\u0301" * 100], id="combining-marks"),
        pytest.param({"user_id": "alice", "exclude_items": ["🙂", "i1"], "filters": {"include_categories": ["ñ"]}},
                     ["alice"], id="unicode-filters"),
        pytest.param({"instances": [{"user_id": "alice"}] * 3 + [{"user_id": "bob"}]}, ["alice"] * 3 + ["bob"],
                     id="duplicate-users-in-batch"),
        pytest.param({"instances": [{"user_id": u} for u in ["carol", "nobody", "carol"]]},
                     ["carol", "nobody", "carol"], id="known-and-unknown-in-batch"),
        pytest.param({"user_id": "alice", "top_k": 100, "num_candidates": 1000}, ["alice"], id="limits-above-catalog"),
        pytest.param({"user_id": "alice", "exclude_items": ITEMS}, ["alice"], id="everything-excluded"),
        pytest.param({"user_id": "alice", "filters": {"min_price": 1e300}}, ["alice"], id="nothing-passes-filters"),
        pytest.param({"user_id": "nobody", "filters": {"include_categories": []}}, ["nobody"],
                     id="unknown-user-no-category"),
    ],
)
def test_odd_but_valid_requests_are_answered(server: Server, payload: dict, user_ids: list[str]) -> None:
    reply = server.request("POST", "/invocations", json.dumps(payload, ensure_ascii=False).encode(),
                           {"Content-Type": "application/json; charset=UTF-8", "Accept": "*/*"})
    assert_answer(reply, user_ids)


def test_duplicate_keys_keep_the_last_value(server: Server) -> None:
    """Python's json keeps the last of duplicate keys; documented rather than refused."""
    assert_answer(server.invoke(b'{"user_id": "alice", "user_id": "bob"}'), ["bob"])


def test_7_mb_body_is_refused_by_the_model_server_itself(server: Server) -> None:
    """Beyond MAX_REQUEST_BYTES + 1 MiB, MMS answers 413 with an empty body before our handler runs.

    SageMaker's own front end caps an invocation at 6 MB, so in production such a body never
    reaches the container; the server must just survive it.
    """
    reply = server.invoke(body_of(7_000_000))
    assert reply.status == 413
    assert reply.body == b""
    assert_still_serving(server)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"GARBAGE\r\n\r\n", id="not-http"),
        pytest.param(b"POST /invocations HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
                     id="huge-header"),
        pytest.param(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n0\r\n\r\n", id="bad-chunk"),
        pytest.param(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5\r\nConnection: close\r\n\r\n{\"user_id\": \"alice\"}", id="short-length"),
        pytest.param(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                     id="unknown-path"),
    ],
)
def test_broken_http_is_dropped_or_refused_never_a_5xx(server: Server, raw: bytes) -> None:
    """Requests MMS's HTTP layer cannot parse are dropped (connection reset) or answered 4xx."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        try:
            sock.sendall(raw)
            answer = sock.recv(65536)
        except ConnectionResetError:
            answer = b""
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer[:300]
        assert b"Traceback" not in answer
    assert_still_serving(server)


# Generated bodies: well-formed requests (they reach the recommender with every mix of filters,
# exclusions and limits), requests with junk in any field, any JSON, any bytes.
ids = st.sampled_from([*USERS, "nobody"]) | st.text(min_size=1, max_size=8)
json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)
categories = st.lists(st.sampled_from(["even", "odd"]) | st.text(max_size=4), max_size=3)
valid_filters = st.fixed_dictionaries({}, optional={
    "include_categories": categories, "exclude_categories": categories,
    "min_price": st.floats(0, 70), "max_price": st.floats(0, 70),
})
valid_request = st.fixed_dictionaries({"user_id": ids}, optional={
    "top_k": st.integers(1, 100),
    "num_candidates": st.integers(100, 1000),
    "exclude_items": st.lists(st.sampled_from(ITEMS) | st.text(min_size=1, max_size=4), max_size=6),
    "filters": valid_filters,
    "on_unknown_user": st.sampled_from(["popular", "error"]),
})
hostile_request = st.fixed_dictionaries({"user_id": ids | json_values}, optional={
    "top_k": st.integers(-1, 102) | json_values,
    "num_candidates": st.integers(-1, 1001) | json_values,
    "exclude_items": st.lists(st.sampled_from(ITEMS), max_size=6) | json_values,
    "filters": valid_filters | json_values,
    "on_unknown_user": st.sampled_from(["popular", "error", "never"]) | json_values,
})
bodies = st.one_of(
    valid_request.map(json.dumps),
    st.lists(valid_request, min_size=1, max_size=4).map(lambda r: json.dumps({"instances": r})),
    hostile_request.map(json.dumps),
    st.lists(hostile_request, min_size=1, max_size=3).map(lambda r: json.dumps({"instances": r})),
    json_values.map(json.dumps),
    st.binary(max_size=48),
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_fuzzed_bodies_over_http_are_200_or_a_json_4xx(server: Server, body: str | bytes) -> None:
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    reply = server.invoke(raw)
    event(f"HTTP {reply.status}")  # the mix shows in --hypothesis-show-statistics
    if reply.status == 200:
        body_json = reply.json()
        answers = body_json.get("predictions", [body_json])
        assert all(set(a) >= {"user_id", "recommendations", "degraded"} for a in answers)
    else:
        assert reply.status in (400, 404, 413), reply.body[:300]
        assert_json_error(reply, reply.status)
    assert_still_serving(server)


# In-process: the whole path (decode, recommend, encode) on generated requests. A bug of ours
# (any exception that is not a domain error, or an answer that is not JSON) fails here.
@pytest.fixture(scope="module")
def service(tiny_model_dir: Path):  # noqa: ANN201 - a RecommendationService
    return load_service(tiny_model_dir)


@settings(max_examples=2000, deadline=None, derandomize=True, database=None)
@given(body=bodies)
def test_fuzzed_bodies_through_the_whole_request_path(service: object, body: str | bytes) -> None:
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    try:
        payload, content_type = output_fn(predict_fn(RawRequest(raw), service), JSON)
    except RecommenderError as exc:
        event(f"{int(exc.status)} {exc.error}")
        assert 400 <= exc.status < 500 and exc.message
        return
    event("200")
    assert content_type == JSON
    json.loads(payload)  # allow_nan=False in output_fn: a NaN would have raised


# No pickle anywhere: pickle turns a model file into code execution.
def test_no_pickle_in_the_code() -> None:
    assert find_pickle_uses(REPO) == []


def test_artifact_holds_no_pickle_and_loads_with_allow_pickle_false(tiny_model_dir: Path) -> None:
    for path in sorted(tiny_model_dir.iterdir()):
        head = path.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in {bytes([p]) for p in range(2, 6)}), f"{path.name} is a pickle"
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False, mmap_mode="r")
            assert array.dtype != object
