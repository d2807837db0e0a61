"""Content-type and Accept negotiation. Only JSON is spoken; parameters are tolerated."""

from __future__ import annotations

from typing import Final

from twostage_rec.errors import NotAcceptable, UnsupportedMediaType

JSON: Final = "application/json"
_ACCEPTABLE: Final = frozenset({JSON, "application/*", "*/*"})


def media_type(header: str | None) -> str:
    """``'Application/JSON; charset=utf-8'`` -> ``'application/json'``."""
    return (header or "").split(";", 1)[0].strip().lower()


def require_json_content(content_type: str | None) -> None:
    """Raise 415 unless the body is declared as JSON (a missing header is also refused)."""
    kind = media_type(content_type)
    if kind != JSON:
        shown = content_type if content_type else "(none)"
        raise UnsupportedMediaType(f"Content-Type {shown} is not supported; send {JSON}")
    charset = _parameter(content_type or "", "charset")
    if charset and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"charset {charset} is not supported; send UTF-8 JSON")


def negotiate_accept(accept: str | None) -> str:
    """Return the response media type, or raise 406 if the client accepts no JSON at all."""
    if not accept or not accept.strip():
        return JSON
    for candidate in accept.split(","):
        kind = media_type(candidate)
        q = _parameter(candidate, "q")
        if kind in _ACCEPTABLE and q not in ("0", "0.0", "0.00", "0.000"):
            return JSON
    raise NotAcceptable(f"Accept {accept} does not include {JSON}, the only response type")


def _parameter(header: str, name: str) -> str | None:
    for part in header.split(";")[1:]:
        key, _, value = part.partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"')
    return None
