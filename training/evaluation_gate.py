"""The evaluation gate of ``deploy --update``: a new model may not serve worse than the live one.

Training writes the offline leave-last-out NDCG@10, measured through the serving path, into the
model's manifest as ``extra["evaluation"]["ndcg@10"]``. The gate reads that manifest from the new
archive (a local model.tar.gz or an S3 object) and from the live model's archive (its
``ModelDataUrl``), without unpacking the rest: the gzip stream is read only up to the manifest.
It refuses the update when the new model's NDCG@10 is below the live one's by more than the
tolerance, when either manifest lacks the number, or when the two were trained on different
datasets (their NDCG@10 do not compare); ``--force`` overrides all three.
"""

from __future__ import annotations

import json
import math
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from training.deployment import DeploymentError, one_line, s3_location, say

METRIC: Final = "ndcg@10"
DEFAULT_TOLERANCE: Final = 0.005
_MAX_MANIFEST_BYTES: Final = 16 << 20  # far above any manifest; bounds what a corrupt archive can make us read


class GateRefusal(DeploymentError):
    """The evaluation gate refused an update; nothing was created."""


@dataclass(frozen=True)
class Evaluation:
    """What the gate compares, from one model's manifest."""

    source: str  # the archive it was read from, for messages
    dataset: str
    ndcg_at_10: float | None


@dataclass(frozen=True)
class GateCase:
    """One variant's comparison: the new archive (local path or s3:// URL) against the live model's."""

    variant: str
    new_source: Path | str
    live_source: str


def read_manifest(source: Path | str, s3: Any) -> dict[str, Any]:
    """The ``model_manifest.json`` of a model.tar.gz, local or ``s3://``; stops reading at the manifest."""
    where = str(source)
    if isinstance(source, str) and source.startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = s3_location(source, "model")
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        except ClientError as exc:
            raise DeploymentError(f"{where}: {exc.response.get('Error', {}).get('Code')}") from None
        except BotoCoreError as exc:
            raise DeploymentError(f"{where}: {one_line(str(exc))}") from None
        try:
            return _manifest_in(body, where)
        finally:
            body.close()
    try:
        with open(source, "rb") as stream:
            return _manifest_in(stream, where)
    except OSError as exc:
        raise DeploymentError(f"{where}: cannot read the model archive ({exc.strerror or exc})") from None


def _manifest_in(stream: IO[bytes], where: str) -> dict[str, Any]:
    from twostage_rec.artifact import MANIFEST

    try:
        # "r|gz": a forward-only stream, so an S3 body is read only as far as the manifest.
        with tarfile.open(fileobj=stream, mode="r|gz") as archive:
            for member in archive:
                if member.isfile() and member.name.removeprefix("./") == MANIFEST:
                    text = archive.extractfile(member).read(_MAX_MANIFEST_BYTES)  # type: ignore[union-attr]
                    body = json.loads(text)
                    if not isinstance(body, dict):
                        raise DeploymentError(f"{where}: {MANIFEST} is not a JSON object")
                    return body
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeploymentError(f"{where}: unreadable model archive ({one_line(str(exc))})") from None
    raise DeploymentError(f"{where}: no {MANIFEST} in the archive")


def evaluation(manifest: dict[str, Any], source: str) -> Evaluation:
    """The manifest's dataset and ``extra.evaluation['ndcg@10']`` (None when absent or not a number)."""
    extra = manifest.get("extra")
    scores = extra.get("evaluation") if isinstance(extra, dict) else None
    value = scores.get(METRIC) if isinstance(scores, dict) else None
    usable = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return Evaluation(source, str(manifest.get("dataset") or ""), float(value) if usable else None)


def problem(variant: str, new: Evaluation, live: Evaluation, tolerance: float) -> str | None:
    """Why the gate refuses this variant's new model, in one clause; None when it passes."""
    for which, model in (("new", new), ("live", live)):
        if model.ndcg_at_10 is None:
            return f"{variant}: the {which} model's manifest has no extra.evaluation[{METRIC!r}] ({model.source})"
    if new.dataset != live.dataset:
        return (f"{variant}: the new model was trained on {new.dataset or 'an unnamed dataset'!r}, the live one on "
                f"{live.dataset or 'an unnamed dataset'!r}; their NDCG@10 do not compare")
    assert new.ndcg_at_10 is not None and live.ndcg_at_10 is not None
    if new.ndcg_at_10 < live.ndcg_at_10 - tolerance:
        return (f"{variant}: new model NDCG@10 {new.ndcg_at_10:.4f} < live {live.ndcg_at_10:.4f} "
                f"- tolerance {tolerance:g}")
    return None


def check(s3: Any, cases: Sequence[GateCase], tolerance: float, force: bool) -> None:
    """Compare every case; raise :class:`GateRefusal` (one line) unless all pass or ``force``."""
    problems = []
    for case in cases:
        try:
            new = evaluation(read_manifest(case.new_source, s3), str(case.new_source))
            live = evaluation(read_manifest(case.live_source, s3), case.live_source)
        except DeploymentError as exc:  # e.g. the live archive is gone from S3: --force may still update
            problems.append(f"{case.variant}: {exc}")
            continue
        found = problem(case.variant, new, live, tolerance)
        if found is None:
            say(f"evaluation gate: {case.variant}: NDCG@10 new {new.ndcg_at_10:.4f}, live {live.ndcg_at_10:.4f} "
                f"(tolerance {tolerance:g}): passed")
        else:
            problems.append(found)
    if not problems:
        return
    if force:
        say(f"evaluation gate overridden by --force: {'; '.join(problems)}")
        return
    raise GateRefusal(f"evaluation gate: {'; '.join(problems)}; nothing created (--force updates anyway)")
