"""Domain errors, each carrying its HTTP status. The one place errors become statuses.

A bug of ours is a 500, never a 400: only these classes produce 4xx responses, and everything
else that escapes the handler is logged with its traceback and answered as
:class:`InternalError` with a generic message.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, ClassVar


class RecommenderError(Exception):
    """Base class: ``status`` and ``error`` (a stable machine-readable code) go to the caller."""

    status: ClassVar[HTTPStatus] = HTTPStatus.INTERNAL_SERVER_ERROR
    error: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self, request_id: str | None) -> dict[str, Any]:
        return {"error": self.error, "message": self.message, "request_id": request_id}


class BadRequest(RecommenderError):
    status = HTTPStatus.BAD_REQUEST
    error = "bad_request"


class UserNotFound(RecommenderError):
    status = HTTPStatus.NOT_FOUND
    error = "user_not_found"


class NotAcceptable(RecommenderError):
    status = HTTPStatus.NOT_ACCEPTABLE
    error = "not_acceptable"


class PayloadTooLarge(RecommenderError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    error = "payload_too_large"


class UnsupportedMediaType(RecommenderError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    error = "unsupported_media_type"


class FeatureSourceUnavailable(RecommenderError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    error = "feature_source_unavailable"


class InternalError(RecommenderError):
    """What the caller sees for any unexpected exception; details stay in the log."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR
    error = "internal_error"

    def __init__(self, message: str = "internal error; the request id is in the server log") -> None:
        super().__init__(message)


def as_recommender_error(exc: BaseException) -> RecommenderError:
    """Map any exception to what the caller may see: domain errors pass, the rest become 500."""
    return exc if isinstance(exc, RecommenderError) else InternalError()
