"""multi-model-server's handler service: the toolkit's contract, our error handling.

MMS imports this module in each worker and calls :func:`handle` once with ``data=None`` to load
the model, then once per request batch. The toolkit's ``Transformer.transform`` is replaced
because it matches content types exactly (``application/json; charset=utf-8`` fails), answers
client errors as 500 and puts a Python traceback in the response body. Here every domain error
becomes its own status with a JSON body ``{error, message, request_id}``; anything else is logged
with its traceback and answered as a generic 500.

Test-only hooks (never set in production): ``TWOSTAGE_TEST_HOOKS=<dir>`` makes each model load
record ``<dir>/load-<pid>`` and fail if the same process loads twice, and makes a request carrying
the header ``X-Twostage-Test-Raise`` fail inside the handler with an unexpected exception.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Final

from sagemaker_inference.default_handler_service import DefaultHandlerService
from sagemaker_inference.transformer import Transformer

from twostage_rec import handler
from twostage_rec.content_types import JSON, is_json_lines, media_type, negotiate_accept
from twostage_rec.errors import PayloadTooLarge, RecommenderError, as_recommender_error
from twostage_rec.handler import RecommendationService
from twostage_rec.request_metrics import RequestMetrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER: Final = "X-Request-Id"
TEST_HOOKS_ENV: Final = "TWOSTAGE_TEST_HOOKS"
TEST_RAISE_HEADER: Final = "x-twostage-test-raise"

_service: HandlerService | None = None


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[str] | None:
    """MMS entry point: ``data=None`` loads the model (once per worker), a list is a request batch."""
    global _service
    if _service is None:
        service = HandlerService()
        service.initialize(context)
        _service = service
    if data is None:
        return None
    return _service.handle(data, context)


class HandlerService(DefaultHandlerService):
    """The toolkit's handler service around :class:`RecommenderTransformer`."""

    def __init__(self) -> None:
        super().__init__(transformer=RecommenderTransformer())

    def initialize(self, context: Any) -> None:
        """Configure worker logging, then load the model through ``model_fn``."""
        configure_worker_logging()
        # Not the parent's initialize: it prepends <model_dir>/code to PYTHONPATH for a user
        # module, and this service binds its functions directly.
        self._service.validate_and_initialize(model_dir=context.system_properties.get("model_dir"), context=context)


class RecommenderTransformer(Transformer):
    """The toolkit's Transformer with our functions bound and our own request/error flow."""

    def __init__(self) -> None:
        super().__init__()
        hooks = os.environ.get(TEST_HOOKS_ENV)
        self._test_hooks_dir = Path(hooks) if hooks else None
        self._metrics: RequestMetrics | None = None  # made with the model: its settings, version, breakers

    def _validate_user_module_and_set_functions(self) -> None:
        # The toolkit looks up SAGEMAKER_PROGRAM on sys.path and falls back to defaults that
        # answer 500 for any content type they do not know; this container has one contract.
        self._model_fn = self._load_model
        self._input_fn = handler.input_fn
        self._predict_fn = handler.predict_fn
        self._output_fn = handler.output_fn

    def _load_model(self, model_dir: str) -> RecommendationService:
        if self._test_hooks_dir is not None:
            _record_load(self._test_hooks_dir)
        service = handler.model_fn(model_dir)
        self._metrics = RequestMetrics.for_worker(service.settings, service.recommender)
        logger.info("model %s loaded from %s", service.recommender.model_version, model_dir)
        return service

    def transform(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        """Answer each request of the batch; never raises, never leaks a traceback."""
        return [self._answer(idx, item, context) for idx, item in enumerate(data)]

    def _answer(self, idx: int, item: dict[str, Any], context: Any) -> str:
        request_id = context.get_request_id(idx) or uuid.uuid4().hex
        context.set_response_header(idx, REQUEST_ID_HEADER, request_id)
        try:
            self.validate_and_initialize(model_dir=context.system_properties.get("model_dir"), context=context)
            headers = _request_headers(context, idx)
            accept = headers.get("accept")
            content_type = headers.get("content-type")
            requested = media_type(content_type)
            negotiate_accept(accept, requested if is_json_lines(requested) else JSON)  # 406 before any work
            body = item.get("body") or b""
            limit = self._model.settings.max_request_bytes
            if len(body) > limit:
                raise PayloadTooLarge(f"request body is {len(body)} bytes; the limit is {limit}")
            if self._test_hooks_dir is not None and TEST_RAISE_HEADER in headers:
                raise RuntimeError("forced failure requested by the test hook header")
            request = self._input_fn(body, content_type)
            prediction = self._predict_fn(request, self._model)
            payload, content_type = self._output_fn(prediction, accept)
            if self._metrics is not None:
                self._metrics.record_answers(prediction.answers)
        except Exception as exc:  # every failure becomes a JSON answer; see _log_failure
            error = as_recommender_error(exc)
            _log_failure(exc, error, request_id)
            if self._metrics is not None:
                self._metrics.record_error(int(error.status))
            context.set_response_status(code=int(error.status), phrase=error.status.phrase, idx=idx)
            payload, content_type = json.dumps(error.body(request_id)), JSON
        context.set_response_content_type(idx, content_type)
        return payload


def configure_worker_logging(level: int = logging.INFO) -> None:
    """Send this package's logs to stderr, which MMS forwards to its log at WARN level.

    MMS logs a worker's stdout at INFO (below the server's log4j threshold, except the metric
    records of :mod:`twostage_rec.request_metrics`) and its stderr at WARN, and points the root
    logger at stdout: the package logger gets its own stderr handler and does not propagate.
    """
    package_logger = logging.getLogger("twostage_rec")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(levelname)s %(name)s pid=%(process)d: %(message)s"))
    package_logger.handlers[:] = [stream]
    package_logger.setLevel(level)
    package_logger.propagate = False


def _log_failure(exc: Exception, error: RecommenderError, request_id: str) -> None:
    status = int(error.status)
    if status < 500:
        logger.info("request %s: %d %s: %s", request_id, status, error.error, error.message)
    else:
        logger.error("request %s: %d %s: %s", request_id, status, error.error, exc, exc_info=exc)


def _request_headers(context: Any, idx: int) -> dict[str, str]:
    """Request headers by lower-case name (MMS also lists per-parameter dicts: skipped)."""
    return {k.lower(): v for k, v in context.get_all_request_header(idx).items() if isinstance(v, str)}


def _record_load(hooks_dir: Path) -> None:
    """Test hook: fail on a second model load in one process (MMS must load once per worker)."""
    marker = hooks_dir / f"load-{os.getpid()}"
    try:
        with marker.open("x", encoding="utf-8") as record:
            record.write(f"{os.getpid()}\n")
    except FileExistsError:
        raise RuntimeError(f"model_fn ran twice in process {os.getpid()}") from None
