"""Content-type and Accept negotiation: JSON for one request or a batch object, JSON Lines for one
request per line (SageMaker Batch Transform). Parameters such as ``charset=utf-8`` are tolerated."""

from __future__ import annotations

from typing import Final

from twostage_rec.errors import NotAcceptable, UnsupportedMediaType

JSON: Final = "application/json"
JSON_LINES: Final = "application/jsonlines"
X_JSON_LINES: Final = "application/x-jsonlines"  # the other name Batch Transform users send
_LINE_TYPES: Final = frozenset({JSON_LINES, X_JSON_LINES})
_WILDCARDS: Final = frozenset({"application/*", "*/*"})


def media_type(header: str | None) -> str:
    """``'Application/JSON; charset=utf-8'`` -> ``'application/json'``."""
    return (header or "").split(";", 1)[0].strip().lower()


def is_json_lines(media: str) -> bool:
    return media in _LINE_TYPES


def request_media_type(content_type: str | None) -> str:
    """The body's media type (JSON or one of the JSON Lines names), or 415 (a missing header too)."""
    kind = media_type(content_type)
    if kind != JSON and kind not in _LINE_TYPES:
        shown = content_type if content_type else "(none)"
        raise UnsupportedMediaType(
            f"Content-Type {shown} is not supported; send {JSON}, or {JSON_LINES} with one request per line"
        )
    charset = _parameter(content_type or "", "charset")
    if charset and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"charset {charset} is not supported; send UTF-8")
    return kind


def negotiate_accept(accept: str | None, request_media: str = JSON) -> str:
    """The response media type: JSON for a JSON request, JSON Lines (the name the client used) for
    a JSON Lines one; 406 when ``accept`` allows neither."""
    lines = request_media in _LINE_TYPES
    if not accept or not accept.strip():
        return request_media if lines else JSON
    for candidate in accept.split(","):
        kind = media_type(candidate)
        if _parameter(candidate, "q") in ("0", "0.0", "0.00", "0.000"):
            continue
        if kind in _WILDCARDS:
            return request_media if lines else JSON
        if kind in (_LINE_TYPES if lines else {JSON}):
            return kind
    wanted = f"{JSON_LINES} (or {X_JSON_LINES})" if lines else JSON
    raise NotAcceptable(f"Accept {accept} does not include {wanted}, the response type of this request")


def _parameter(header: str, name: str) -> str | None:
    for part in header.split(";")[1:]:
        key, _, value = part.partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"')
    return None
