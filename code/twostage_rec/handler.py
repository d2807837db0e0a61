"""The SageMaker inference contract: model_fn, input_fn, predict_fn, output_fn.

``code/inference.py`` re-exports these; the model server's handler service calls them. Each one
is a short step: decode, recommend, encode. Errors are :mod:`twostage_rec.errors` classes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twostage_rec.allocator import keep_heap_pages
from twostage_rec.artifact import load_artifact
from twostage_rec.content_types import JSON, is_json_lines, negotiate_accept, request_media_type
from twostage_rec.errors import BadRequest, RecommenderError
from twostage_rec.recommender import Recommendation, TwoStageRecommender
from twostage_rec.request import RequestLine, decode, decode_lines
from twostage_rec.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecommendationService:
    """What ``model_fn`` returns: the recommender and the settings it was built with."""

    recommender: TwoStageRecommender
    settings: Settings


@dataclass(frozen=True)
class RawRequest:
    """A body whose content type has been accepted; decoded in ``predict_fn`` because the size and
    batch limits live in the service's settings."""

    body: bytes | str
    media_type: str = JSON


@dataclass(frozen=True)
class Prediction:
    """What ``predict_fn`` hands ``output_fn``: the answers in request order (a JSON Lines line that
    got no answer holds its :class:`RequestLine`, error included) and how to encode them."""

    answers: list[Recommendation | RequestLine]
    is_batch: bool
    model_version: str
    media_type: str = JSON  # the request's: a JSON Lines body gets one answer per line


def load_service(
    model_dir: str | Path, settings: Settings | None = None, verify_checksums: bool = False
) -> RecommendationService:
    """Load the artifact and build the recommender (called once per worker)."""
    settings = settings or Settings.from_env()
    keep_heap_pages(settings.malloc_keep_mb << 20)
    artifact = load_artifact(Path(model_dir), verify_checksums=verify_checksums)
    return RecommendationService(TwoStageRecommender(artifact, settings), settings)


def model_fn(model_dir: str, context: Any = None) -> RecommendationService:
    return load_service(model_dir)


def input_fn(input_data: bytes | str, content_type: str | None, context: Any = None) -> RawRequest:
    return RawRequest(input_data, request_media_type(content_type))


def predict_fn(data: RawRequest, model: RecommendationService, context: Any = None) -> Prediction:
    settings, recommender = model.settings, model.recommender
    now = time.time()
    if is_json_lines(data.media_type):
        lines = decode_lines(data.body, settings.max_request_bytes, now)
        answers = answer_lines(recommender, lines, settings.max_batch_size, settings.batch_threads)
        return Prediction(answers, True, recommender.model_version, data.media_type)
    parsed = decode(data.body, settings.max_request_bytes, settings.max_batch_size, now)
    answers = recommender.recommend_many(parsed.requests)
    return Prediction(list(answers), parsed.is_batch, recommender.model_version)


def answer_lines(
    recommender: TwoStageRecommender, lines: Sequence[RequestLine], batch_size: int, threads: int = 1
) -> list[Recommendation | RequestLine]:
    """Every line's answer in line order: the valid requests ``batch_size`` at a time (one pass of
    each stage per batch), up to ``threads`` batches at once; a line that failed to parse, or to be
    answered, gets its own error."""
    results: dict[int, Recommendation | RequestLine] = {}
    valid: list[int] = []
    for position, line in enumerate(lines):
        if line.request is None:
            results[position] = line  # its parse error goes out with it (line_body)
        else:
            valid.append(position)
    chunks = [valid[start : start + batch_size] for start in range(0, len(valid), batch_size)]

    def answer(chunk: list[int]) -> list[Recommendation | RecommenderError]:
        return recommender.answer_many([lines[p].request for p in chunk])  # type: ignore[misc]

    if threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(chunks)), thread_name_prefix="batch") as pool:
            answered = list(pool.map(answer, chunks))
    else:
        answered = [answer(chunk) for chunk in chunks]
    for chunk, answers in zip(chunks, answered):
        for p, got in zip(chunk, answers):
            results[p] = replace(lines[p], error=got) if isinstance(got, RecommenderError) else got
    bad = sum(isinstance(a, RequestLine) for a in results.values())
    if bad:
        logger.info("JSON Lines: %d line(s), %d answered, %d with an error", len(lines), len(lines) - bad, bad)
    return [results[p] for p in range(len(lines))]


def output_fn(prediction: Prediction, accept: str | None, context: Any = None) -> tuple[str, str]:
    media = negotiate_accept(accept, prediction.media_type)
    if is_json_lines(prediction.media_type):
        return encode_lines(prediction.answers, prediction.model_version), media
    bodies = [answer_body(a, prediction.model_version) for a in prediction.answers]  # type: ignore[arg-type]
    payload = {"predictions": bodies} if prediction.is_batch else bodies[0]
    return json.dumps(payload, ensure_ascii=False, allow_nan=False), JSON


def encode_lines(answers: Sequence[Recommendation | RequestLine], model_version: str) -> str:
    """One JSON object per line, no newline after the last: Batch Transform's ``AssembleWith: Line``
    puts one between mini-batches."""
    return "\n".join(json.dumps(line_body(a, model_version), ensure_ascii=False, allow_nan=False) for a in answers)


def line_body(answer: Recommendation | RequestLine, model_version: str) -> dict[str, Any]:
    """A JSON Lines answer: the single-user answer, or ``{"error", "message", "line"}``."""
    if isinstance(answer, RequestLine):
        error = answer.error or BadRequest("no request on this line")
        return {"error": error.error, "message": error.message, "line": answer.line}
    return answer_body(answer, model_version)


def answer_body(answer: Recommendation, model_version: str) -> dict[str, Any]:
    """The answer for one user, as ``/invocations`` returns it."""
    return {
        "user_id": answer.user_id,
        "recommendations": answer.items,
        "model_version": model_version,
        "fallback": answer.fallback,
        "degraded": answer.degraded,
        "ignored_recent_items": answer.ignored_recent_items,
        "as_of": answer.as_of,
        "timings_ms": answer.timings_ms,
    }
