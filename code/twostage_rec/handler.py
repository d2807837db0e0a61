"""The SageMaker inference contract: model_fn, input_fn, predict_fn, output_fn.

``code/inference.py`` re-exports these; the model server's handler service calls them. Each one
is a short step: decode, recommend, encode. Errors are :mod:`twostage_rec.errors` classes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twostage_rec.allocator import keep_heap_pages
from twostage_rec.artifact import load_artifact
from twostage_rec.content_types import JSON, negotiate_accept, require_json_content
from twostage_rec.recommender import Recommendation, TwoStageRecommender
from twostage_rec.request import ParsedRequest, decode
from twostage_rec.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecommendationService:
    """What ``model_fn`` returns: the recommender and the settings it was built with."""

    recommender: TwoStageRecommender
    settings: Settings


@dataclass(frozen=True)
class RawRequest:
    """A JSON body whose content type has been accepted; decoded in ``predict_fn`` because the
    size and batch limits live in the service's settings."""

    body: bytes | str


@dataclass(frozen=True)
class Prediction:
    answers: list[Recommendation]
    is_batch: bool
    model_version: str


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
    require_json_content(content_type)
    return RawRequest(input_data)


def predict_fn(data: RawRequest, model: RecommendationService, context: Any = None) -> Prediction:
    parsed: ParsedRequest = decode(data.body, model.settings.max_request_bytes, model.settings.max_batch_size)
    answers = model.recommender.recommend_many(parsed.requests)
    return Prediction(answers, parsed.is_batch, model.recommender.model_version)


def output_fn(prediction: Prediction, accept: str | None, context: Any = None) -> tuple[str, str]:
    negotiate_accept(accept)
    bodies = [_answer_body(a, prediction.model_version) for a in prediction.answers]
    payload = {"predictions": bodies} if prediction.is_batch else bodies[0]
    return json.dumps(payload, ensure_ascii=False, allow_nan=False), JSON


def _answer_body(answer: Recommendation, model_version: str) -> dict[str, Any]:
    return {
        "user_id": answer.user_id,
        "recommendations": answer.items,
        "model_version": model_version,
        "fallback": answer.fallback,
        "degraded": answer.degraded,
        "ignored_recent_items": answer.ignored_recent_items,
        "timings_ms": answer.timings_ms,
    }
