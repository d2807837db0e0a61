"""Request decoding: every malformed input is a BadRequest/PayloadTooLarge with a clear message."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twostage_rec.content_types import negotiate_accept, request_media_type
from twostage_rec.errors import BadRequest, NotAcceptable, PayloadTooLarge, RecommenderError, UnsupportedMediaType
from twostage_rec.request import MAX_AS_OF_AHEAD_S, decode, decode_lines

LIMIT = 1 << 20
NOW = 1_760_000_000.0  # the server clock these tests run at


def parse(body: object) -> object:
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return decode(raw, LIMIT, 100, NOW)


def test_defaults_and_batch() -> None:
    single = parse({"user_id": "u1"})
    assert single.is_batch is False
    r = single.requests[0]
    assert (r.user_id, r.top_k, r.num_candidates, r.exclude_items) == ("u1", 10, 100, ())
    batch = parse({"instances": [{"user_id": "a"}, {"user_id": "b", "top_k": 3}]})
    assert batch.is_batch and [q.user_id for q in batch.requests] == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe", "UTF-8"),
        (b'{"user_id": "a", "top_k": NaN}', "NaN"),
        (b'{"user_id": "a", "top_k": Infinity}', "Infinity"),
        ({"user_id": 5}, "user_id must be a string"),
        ({"user_id": ""}, "user_id must have"),
        ({"user_id": "a", "top_k": 0}, "between 1 and 100"),
        ({"user_id": "a", "top_k": 101}, "between 1 and 100"),
        ({"user_id": "a", "top_k": -3}, "between 1 and 100"),
        ({"user_id": "a", "top_k": True}, "integer"),
        ({"user_id": "a", "top_k": 2.5}, "integer"),
        ({"user_id": "a", "top_k": 20, "num_candidates": 10}, "num_candidates"),
        ({"user_id": "a", "color": "red"}, "unknown field"),
        ({"user_id": "a", "filters": {"min_price": 5, "max_price": 1}}, "greater than"),
        ({"user_id": "a", "filters": {"cheap": True}}, "unknown filter"),
        ({"user_id": "a", "exclude_items": "i1"}, "list of strings"),
        ({"user_id": "a", "exclude_items": ["x"] * 1001}, "at most 1000"),
        ({"instances": []}, "non-empty"),
        ({"instances": [{"user_id": "a"}] * 101}, "at most 100"),
        ({"instances": [{"user_id": "a"}, {"top_k": 1}]}, "instances[1]"),
        ([1, 2], "JSON object"),
        ({"top_k": 3}, "user_id is required"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (b'{"user_id": "a", "top_k": ' + b"9" * 5000 + b"}", "malformed JSON"),
    ],
)
def test_bad_requests_are_400_with_reason(body: object, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse(body)
    assert fragment in info.value.message


def test_too_large_is_413() -> None:
    with pytest.raises(PayloadTooLarge):
        decode(b" " * 2000, 1000, 100, NOW)


def test_unicode_ids_roundtrip() -> None:
    assert parse({"user_id": "ユーザー,1"}).requests[0].user_id == "ユーザー,1"


@pytest.mark.parametrize(
    ("header", "media"),
    [
        ("application/json", "application/json"),
        ("Application/JSON; charset=utf-8", "application/json"),
        ("application/json;charset=UTF-8", "application/json"),
        ("application/jsonlines", "application/jsonlines"),
        ("application/x-jsonlines; charset=utf-8", "application/x-jsonlines"),
    ],
)
def test_json_and_json_lines_content_types_accepted(header: str, media: str) -> None:
    assert request_media_type(header) == media


@pytest.mark.parametrize(
    "header",
    [None, "", "text/plain", "application/x-npy", "application/json; charset=latin-1", "application/jsonl"],
)
def test_other_content_types_are_415(header: str | None) -> None:
    with pytest.raises(UnsupportedMediaType):
        request_media_type(header)


@pytest.mark.parametrize("accept", [None, "", "*/*", "application/json", "text/html, application/json;q=0.5", "application/*"])
def test_accept_json(accept: str | None) -> None:
    assert negotiate_accept(accept) == "application/json"


@pytest.mark.parametrize("accept", ["text/csv", "application/json;q=0", "text/html, image/png", "application/jsonlines"])
def test_accept_without_json_is_406(accept: str) -> None:
    with pytest.raises(NotAcceptable):
        negotiate_accept(accept)


@pytest.mark.parametrize(
    ("request_media", "accept", "response"),
    [
        ("application/jsonlines", None, "application/jsonlines"),  # JSON Lines in, no Accept: JSON Lines out
        ("application/x-jsonlines", "", "application/x-jsonlines"),
        ("application/jsonlines", "*/*", "application/jsonlines"),
        ("application/jsonlines", "application/x-jsonlines", "application/x-jsonlines"),
        ("application/x-jsonlines", "text/html, application/jsonlines;q=0.5", "application/jsonlines"),
    ],
)
def test_json_lines_answer_in_json_lines(request_media: str, accept: str | None, response: str) -> None:
    assert negotiate_accept(accept, request_media) == response


@pytest.mark.parametrize("accept", ["application/json", "text/csv", "application/jsonlines;q=0"])
def test_json_lines_request_with_an_accept_it_cannot_serve_is_406(accept: str) -> None:
    with pytest.raises(NotAcceptable, match="application/jsonlines"):
        negotiate_accept(accept, "application/jsonlines")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "user_id": json_values | st.text(max_size=20),
        "top_k": json_values | st.integers(-5, 200),
        "num_candidates": json_values | st.integers(-5, 2000),
        "exclude_items": json_values | st.lists(st.text(max_size=5), max_size=5),
        "filters": json_values,
        "instances": json_values,
    },
)


@settings(max_examples=10_000, deadline=None)
@given(st.one_of(request_like, json_values, st.binary(max_size=64)))
def test_fuzzed_bodies_never_escape_as_non_domain_errors(body: object) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body)
    try:
        decode(raw, LIMIT, 100, NOW)
    except RecommenderError as exc:
        assert 400 <= exc.status < 500 and exc.message


def test_recent_items_accept_ids_and_objects_in_order() -> None:
    from twostage_rec.request import RecentItem

    r = parse({"user_id": "u", "recent_items": ["a", {"item_id": "b", "timestamp": 1700000000.9}, {"item_id": "c"}],
               "sort_by": "predicted_rating"}).requests[0]
    assert r.recent_items == (RecentItem("a"), RecentItem("b", 1700000000), RecentItem("c"))
    assert r.sort_by == "predicted_rating"
    assert parse({"user_id": "u"}).requests[0].sort_by == "score"


@pytest.mark.parametrize(
    ("recent", "fragment"),
    [
        ("a", "recent_items must be a list"),
        ([1], "recent_items[0] must be a string"),
        (["a", None], "recent_items[1] must be a string"),
        ([{"item_id": 3}], "recent_items[0].item_id must be a string"),
        ([{"timestamp": 3}], "recent_items[0].item_id is required"),
        ([{"item_id": "a", "timestamp": "yesterday"}], "recent_items[0].timestamp must be a number"),
        ([{"item_id": "a", "timestamp": True}], "recent_items[0].timestamp must be a number"),
        ([{"item_id": "a", "timestamp": -1}], "recent_items[0].timestamp must be epoch seconds"),
        ([{"item_id": "a", "when": 1}], "recent_items[0]: unknown field"),
        (["a"] * 201, "at most 200"),
    ],
)
def test_bad_recent_items_name_the_field(recent: object, fragment: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse({"user_id": "u", "recent_items": recent})
    assert fragment in err.value.message


def test_bad_sort_by_is_a_400() -> None:
    with pytest.raises(BadRequest, match="sort_by"):
        parse({"user_id": "u", "sort_by": "price"})


@pytest.mark.parametrize(
    ("as_of", "expected"),
    [
        (1_700_000_000, 1_700_000_000),
        (1_700_000_000.9, 1_700_000_000),  # whole seconds, rounded down
        (0, 0),
        ("2023-11-14T22:13:20Z", 1_700_000_000),
        ("2023-11-15T00:13:20+02:00", 1_700_000_000),
        (NOW + MAX_AS_OF_AHEAD_S, int(NOW) + MAX_AS_OF_AHEAD_S),
    ],
)
def test_as_of_accepts_epoch_seconds_and_iso_8601_with_a_zone(as_of: object, expected: int) -> None:
    assert parse({"user_id": "u", "as_of": as_of}).requests[0].as_of == expected
    assert parse({"user_id": "u"}).requests[0].as_of is None  # the server clock, at answer time


@pytest.mark.parametrize(
    ("as_of", "fragment"),
    [
        ("yesterday", "not an ISO 8601 time"),
        ("2023-11-14T22:13:20", "needs a time zone"),
        (True, "must be epoch seconds or an ISO 8601 string"),
        ([1], "must be epoch seconds or an ISO 8601 string"),
        (-1, "from 1970 on"),
        ("1969-12-31T23:59:59Z", "from 1970 on"),
        (1e308, "more than one day ahead"),
        (NOW + MAX_AS_OF_AHEAD_S + 1, "more than one day ahead"),
    ],
)
def test_bad_as_of_is_a_400_naming_the_field(as_of: object, fragment: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse({"user_id": "u", "as_of": as_of})
    assert "as_of" in err.value.message and fragment in err.value.message


def test_as_of_nan_or_infinity_is_a_400() -> None:
    for raw in (b'{"user_id": "u", "as_of": NaN}', b'{"user_id": "u", "as_of": -Infinity}'):
        with pytest.raises(BadRequest, match="not valid JSON"):
            parse(raw)


def test_json_lines_give_each_line_its_request_or_its_error() -> None:
    body = "\n".join(
        ['{"user_id": "a"}', "not json", "", "[1, 2]", '{"user_id": "b", "top_k": 0}', '{"user_id": "c"}\r']
    ) + "\n"
    lines = decode_lines(body, LIMIT, NOW)
    assert [line.line for line in lines] == [1, 2, 3, 4, 5, 6]  # the final newline ends line 6
    assert [line.request.user_id if line.request else None for line in lines] == ["a", None, None, None, None, "c"]
    messages = {line.line: line.error.message for line in lines if line.error}
    assert "malformed JSON" in messages[2] and "empty line" in messages[3]
    assert "JSON object, not a list" in messages[4] and "top_k" in messages[5]


def test_json_lines_body_errors_fail_as_a_whole() -> None:
    with pytest.raises(PayloadTooLarge):
        decode_lines(b'{"user_id": "a"}\n' * 100, 500, NOW)
    with pytest.raises(BadRequest, match="UTF-8"):
        decode_lines(b"\xff\n", LIMIT, NOW)
    with pytest.raises(BadRequest, match="empty"):
        decode_lines(b"", LIMIT, NOW)
