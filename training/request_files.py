"""Recommendations for a file of requests, through the serving code: a backfill, a backtest, a
nightly job on one machine. The format is Batch Transform's: one ``/invocations`` request object per
line in, one answer object per line out, in input order, and ``{"error", "message", "line"}`` for a
line that has no answer. Output is written to a temporary file and renamed: never half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from training.datasets import DataError
from twostage_rec.handler import answer_lines, line_body
from twostage_rec.recommender import TwoStageRecommender
from twostage_rec.request import RecommendationRequest, RequestLine, decode_line
from twostage_rec.settings import Settings, available_cpus

# Lines read, parsed and answered at a time: the recommender itself answers 100 users per pass.
CHUNK_LINES = 2_000
BATCH_USERS = 100


def recommend_requests_file(model_dir: Path, requests: Path, out: Path) -> tuple[int, int]:
    """Answer every line of ``requests`` into ``out``; returns (lines, lines with an error)."""
    lines = _readable_lines(requests)
    recommender = TwoStageRecommender.from_model_dir(model_dir, Settings())
    total = bad = 0
    with _atomic_text(out) as handle, lines:
        chunk: list[str] = []
        for raw in _lines(lines):
            chunk.append(raw)
            if len(chunk) == CHUNK_LINES:
                bad += _answer_chunk(recommender, chunk, total, handle)
                total += len(chunk)
                chunk = []
        if chunk:
            bad += _answer_chunk(recommender, chunk, total, handle)
            total += len(chunk)
        if total == 0:
            raise DataError(f"{requests}: no requests (the file is empty); write one JSON object per line")
    return total, bad


def recommend_users_file(model_dir: Path, users_file: Path, k: int, out: Path) -> int:
    """One JSON line ``{"user_id", "items"}`` per user id of ``users_file`` (one id a line)."""
    handle = _readable_lines(users_file)
    with handle:
        user_ids = [line.strip() for line in handle if line.strip()]
    if not user_ids:
        raise DataError(f"{users_file}: no user ids (the file is empty); write one user id per line")
    recommender = TwoStageRecommender.from_model_dir(model_dir, Settings())
    field = recommender.item_id_field
    with _atomic_text(out) as writer:
        for start in range(0, len(user_ids), BATCH_USERS):
            chunk = user_ids[start : start + BATCH_USERS]
            answers = recommender.recommend_many(
                [RecommendationRequest(u, top_k=k, num_candidates=max(100, k)) for u in chunk]
            )
            for answer in answers:
                items = [i[field] for i in answer.items]
                writer.write(json.dumps({"user_id": answer.user_id, "items": items}, ensure_ascii=False) + "\n")
    return len(user_ids)


def _answer_chunk(recommender: TwoStageRecommender, raw_lines: list[str], offset: int, out: IO[str]) -> int:
    now = time.time()
    parsed = [decode_line(offset + n, raw, now) for n, raw in enumerate(raw_lines, start=1)]
    answers = answer_lines(recommender, parsed, BATCH_USERS, available_cpus())
    version = recommender.model_version
    for answer in answers:
        out.write(json.dumps(line_body(answer, version), ensure_ascii=False, allow_nan=False) + "\n")
    return sum(isinstance(a, RequestLine) for a in answers)


def _readable_lines(path: Path) -> IO[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None


def _lines(handle: IO[str]) -> Iterator[str]:
    """The file's lines without their newline; a final newline ends the last line, it does not add one."""
    try:
        for line in handle:
            yield line.removesuffix("\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{handle.name}: not UTF-8 text (byte {exc.start} of a block)") from None


@contextmanager
def _atomic_text(out: Path) -> Iterator[IO[str]]:
    """A text file that appears at ``out`` only when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
        os.chmod(partial, 0o644)  # mkstemp's file is private; this one is a normal output file
        os.replace(partial, out)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
