"""Request decoding and validation: bytes in, typed requests out, or a 4xx with a clear message."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from twostage_rec.errors import BadRequest, PayloadTooLarge, RecommenderError

TOP_K_DEFAULT: Final = 10
TOP_K_MAX: Final = 100
NUM_CANDIDATES_DEFAULT: Final = 100
NUM_CANDIDATES_MAX: Final = 1000
MAX_ID_LENGTH: Final = 512
MAX_LIST_LENGTH: Final = 1000
MAX_RECENT_ITEMS: Final = 200
SORT_KEYS: Final = ("score", "predicted_rating")
# A request may say what moment it is asking about (a backtest, a batch job); the future is allowed
# only as far as clocks plausibly disagree.
MAX_AS_OF_AHEAD_S: Final = 86_400

_FIELDS: Final = frozenset(
    {"user_id", "top_k", "num_candidates", "exclude_items", "filters", "on_unknown_user", "recent_items", "sort_by",
     "as_of"}
)
_RECENT_ITEM_FIELDS: Final = frozenset({"item_id", "timestamp"})
_FILTER_FIELDS: Final = frozenset({"include_categories", "exclude_categories", "min_price", "max_price"})


@dataclass(frozen=True)
class Filters:
    include_categories: tuple[str, ...] | None = None
    exclude_categories: tuple[str, ...] = ()
    min_price: float | None = None
    max_price: float | None = None

    @property
    def active(self) -> bool:
        return bool(
            self.include_categories is not None
            or self.exclude_categories
            or self.min_price is not None
            or self.max_price is not None
        )


@dataclass(frozen=True)
class RecentItem:
    """An interaction the model has not seen; ``timestamp`` None means the request's ``as_of``."""

    item_id: str
    timestamp: int | None = None


@dataclass(frozen=True)
class RecommendationRequest:
    user_id: str
    top_k: int = TOP_K_DEFAULT
    num_candidates: int = NUM_CANDIDATES_DEFAULT
    exclude_items: tuple[str, ...] = ()
    filters: Filters = field(default_factory=Filters)
    on_unknown_user: str | None = None  # "popular" | "error"; None = the server's policy
    recent_items: tuple[RecentItem, ...] = ()  # oldest first, appended to the stored history
    sort_by: str = "score"  # or "predicted_rating" (the original design's order)
    # The moment the answer is for (epoch seconds): nothing after it is used. None: the server clock.
    as_of: int | None = None


@dataclass(frozen=True)
class ParsedRequest:
    """One call: a single request, or a batch whose answers keep the request order."""

    requests: tuple[RecommendationRequest, ...]
    is_batch: bool


@dataclass(frozen=True)
class RequestLine:
    """One line of a JSON Lines body: its request, and why it got no answer when it did not (the
    line's parse error, or the recommender's error for its request)."""

    line: int  # 1-based, as an editor counts
    request: RecommendationRequest | None
    error: RecommenderError | None = None


def decode(body: bytes | bytearray | str, max_bytes: int, max_batch: int, now: float) -> ParsedRequest:
    """Parse and validate a JSON request body; ``now`` is the server clock (epoch seconds)."""
    text = _text(body, max_bytes)
    if not text.strip():
        raise BadRequest("request body is empty; send a JSON object with a user_id")
    payload = _json(text)
    if not isinstance(payload, dict):
        raise BadRequest(f"the body must be a JSON object, not {_json_type(payload)}")
    if "instances" in payload:
        return _decode_batch(payload, max_batch, now)
    return ParsedRequest((parse_request(payload, now),), is_batch=False)


def decode_lines(body: bytes | bytearray | str, max_bytes: int, now: float) -> list[RequestLine]:
    """Parse a JSON Lines body: one request object per line, each line on its own.

    A line that is empty, not JSON, not an object or not a valid request gets its error and the
    others are parsed; only a body that is too large or not UTF-8 fails as a whole. The newline
    after the last line is a terminator, not an empty line.
    """
    text = _text(body, max_bytes)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise BadRequest("request body is empty; send one JSON object with a user_id per line")
    return [decode_line(number, raw, now) for number, raw in enumerate(lines, start=1)]


def decode_line(number: int, raw: str, now: float) -> RequestLine:
    """Line ``number`` of a JSON Lines body (its ``\\r``, if any, is dropped): its request or its error."""
    raw = raw.removesuffix("\r")
    try:
        if not raw.strip():
            raise BadRequest("empty line; send one JSON object with a user_id per line")
        payload = _json(raw)
        if not isinstance(payload, dict):
            raise BadRequest(f"the line must be a JSON object, not {_json_type(payload)}")
        return RequestLine(number, parse_request(payload, now))
    except BadRequest as exc:
        return RequestLine(number, None, exc)


def _text(body: bytes | bytearray | str, max_bytes: int) -> str:
    if isinstance(body, str):
        body = body.encode("utf-8", errors="surrogatepass")
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"request body is {len(body)} bytes; the limit is {max_bytes}")
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None


def _json(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise BadRequest("JSON is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's digit limit
        raise BadRequest(f"malformed JSON: {exc}") from None


def _decode_batch(payload: Mapping[str, Any], max_batch: int, now: float) -> ParsedRequest:
    extra = set(payload) - {"instances"}
    if extra:
        raise BadRequest(f"unknown field(s) next to instances: {', '.join(sorted(map(str, extra)))}")
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise BadRequest("instances must be a non-empty list of request objects")
    if len(instances) > max_batch:
        raise BadRequest(f"instances has {len(instances)} entries; at most {max_batch} per call")
    requests = []
    for position, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise BadRequest(f"instances[{position}] must be an object, not {_json_type(instance)}")
        try:
            requests.append(parse_request(instance, now))
        except BadRequest as exc:
            raise BadRequest(f"instances[{position}]: {exc.message}") from None
    return ParsedRequest(tuple(requests), is_batch=True)


def parse_request(obj: Mapping[str, Any], now: float) -> RecommendationRequest:
    """Validate one request object (already JSON-decoded); ``now`` is the server clock (epoch seconds)."""
    unknown = set(obj) - _FIELDS
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    if "user_id" not in obj:
        raise BadRequest("user_id is required")
    user_id = _identifier(obj["user_id"], "user_id")
    top_k = _integer(obj.get("top_k", TOP_K_DEFAULT), "top_k", 1, TOP_K_MAX)
    num_candidates = _integer(
        obj.get("num_candidates", max(NUM_CANDIDATES_DEFAULT, top_k)), "num_candidates", top_k, NUM_CANDIDATES_MAX
    )
    exclude = _id_list(obj.get("exclude_items", []), "exclude_items")
    policy = obj.get("on_unknown_user")
    if policy is not None and policy not in ("popular", "error"):
        raise BadRequest("on_unknown_user must be \"popular\" or \"error\"")
    sort_by = obj.get("sort_by", "score")
    if sort_by not in SORT_KEYS:
        raise BadRequest("sort_by must be \"score\" or \"predicted_rating\"")
    return RecommendationRequest(
        user_id=user_id,
        top_k=top_k,
        num_candidates=num_candidates,
        exclude_items=exclude,
        filters=_filters(obj.get("filters")),
        on_unknown_user=policy,
        recent_items=_recent_items(obj.get("recent_items", [])),
        sort_by=sort_by,
        as_of=_as_of(obj.get("as_of"), now),
    )


def _as_of(value: Any, now: float) -> int | None:
    """Epoch seconds (a number) or an ISO 8601 string with a time zone, from 1970 to a day ahead."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise BadRequest(f"as_of {value[:64]!r} is not an ISO 8601 time (e.g. 2024-05-01T12:00:00Z)") from None
        if moment.tzinfo is None:
            raise BadRequest("as_of needs a time zone (e.g. 2024-05-01T12:00:00Z or +02:00)")
        seconds = moment.timestamp()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise BadRequest(f"as_of must be epoch seconds or an ISO 8601 string, not {_json_type(value)}")
    if not math.isfinite(seconds) or seconds < 0:
        raise BadRequest("as_of must be a time from 1970 on")
    if seconds > now + MAX_AS_OF_AHEAD_S:
        raise BadRequest("as_of is more than one day ahead of the server clock")
    return int(math.floor(seconds))


def _recent_items(value: Any) -> tuple[RecentItem, ...]:
    """Item ids (strings) or ``{"item_id", "timestamp"}`` objects, oldest first, at most 200."""
    if not isinstance(value, list):
        raise BadRequest(f"recent_items must be a list, not {_json_type(value)}")
    if len(value) > MAX_RECENT_ITEMS:
        raise BadRequest(f"recent_items has {len(value)} entries; at most {MAX_RECENT_ITEMS}")
    items = []
    for position, entry in enumerate(value):
        name = f"recent_items[{position}]"
        if isinstance(entry, dict):
            unknown = set(entry) - _RECENT_ITEM_FIELDS
            if unknown:
                raise BadRequest(f"{name}: unknown field(s): {', '.join(sorted(map(str, unknown)))}")
            if "item_id" not in entry:
                raise BadRequest(f"{name}.item_id is required")
            item_id = _identifier(entry["item_id"], f"{name}.item_id")
            items.append(RecentItem(item_id, _timestamp(entry.get("timestamp"), name)))
        else:
            items.append(RecentItem(_identifier(entry, name)))
    return tuple(items)


def _timestamp(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name}.timestamp must be a number (epoch seconds), not {_json_type(value)}")
    if not math.isfinite(value) or not 0 <= value < 2**53:
        raise BadRequest(f"{name}.timestamp must be epoch seconds between 0 and 2**53")
    return int(value)


def _filters(value: Any) -> Filters:
    if value is None:
        return Filters()
    if not isinstance(value, dict):
        raise BadRequest(f"filters must be an object, not {_json_type(value)}")
    unknown = set(value) - _FILTER_FIELDS
    if unknown:
        raise BadRequest(f"unknown filter(s): {', '.join(sorted(map(str, unknown)))}")
    include = value.get("include_categories")
    min_price = _price(value.get("min_price"), "filters.min_price")
    max_price = _price(value.get("max_price"), "filters.max_price")
    if min_price is not None and max_price is not None and min_price > max_price:
        raise BadRequest("filters.min_price is greater than filters.max_price")
    return Filters(
        include_categories=None if include is None else _id_list(include, "filters.include_categories"),
        exclude_categories=_id_list(value.get("exclude_categories", []), "filters.exclude_categories"),
        min_price=min_price,
        max_price=max_price,
    )


def _identifier(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, not {_json_type(value)}")
    if not value or len(value) > MAX_ID_LENGTH:
        raise BadRequest(f"{name} must have 1 to {MAX_ID_LENGTH} characters")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise BadRequest(f"{name} contains an unpaired surrogate")
    return value


def _id_list(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"{name} must be a list of strings, not {_json_type(value)}")
    if len(value) > MAX_LIST_LENGTH:
        raise BadRequest(f"{name} has {len(value)} entries; at most {MAX_LIST_LENGTH}")
    return tuple(_identifier(v, f"{name}[{i}]") for i, v in enumerate(value))


def _integer(value: Any, name: str, low: int, high: int) -> int:
    # bool is an int in Python; true is not a valid top_k.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, not {_json_type(value)}")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}")
    return value


def _price(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a number, not {_json_type(value)}")
    if not math.isfinite(value) or value < 0:
        raise BadRequest(f"{name} must be a finite number >= 0")
    return float(value)


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not valid JSON; send finite numbers")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return names.get(type(value), type(value).__name__)
