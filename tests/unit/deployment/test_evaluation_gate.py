"""``training.evaluation_gate``: manifests read from archives (local and S3) and the comparison."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import IO

import pytest

from tests.support.sagemaker_fakes import BUCKET, manifest_tar
from training import deployment, evaluation_gate
from training.deployment import DeploymentError
from training.evaluation_gate import Evaluation, GateCase, GateRefusal
from twostage_rec.artifact import MANIFEST


class CountingReader(io.RawIOBase):
    """A file's bytes, counting how many were read."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.read_bytes = stream, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        self.read_bytes += len(data)
        return len(data)


def test_the_manifest_is_read_without_unpacking_what_follows_it(tmp_path: Path) -> None:
    path = tmp_path / "model.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        members = ((MANIFEST, json.dumps({"dataset": "ml-1m"}).encode()), ("user_factors.npy", os.urandom(4 << 20)))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with open(path, "rb") as raw:
        reader = CountingReader(raw)
        assert evaluation_gate._manifest_in(reader, str(path)) == {"dataset": "ml-1m"}  # type: ignore[arg-type]
    assert reader.read_bytes < 256 << 10 < path.stat().st_size  # the random 4 MB barely compress


def test_manifests_from_a_local_archive_and_from_s3_agree(tmp_path: Path, clients: deployment.AwsClients) -> None:
    tar = manifest_tar(tmp_path / "model.tar.gz", 0.25, "ml-100k", version="v7")
    clients.s3.upload_file(str(tar), BUCKET, "m/model.tar.gz")
    local = evaluation_gate.read_manifest(tar, clients.s3)
    remote = evaluation_gate.read_manifest(f"s3://{BUCKET}/m/model.tar.gz", clients.s3)
    assert local == remote and local["model_version"] == "v7"
    assert evaluation_gate.evaluation(local, "x") == Evaluation("x", "ml-100k", 0.25)


def test_the_real_tiny_model_has_a_manifest_but_no_evaluation(model_tar: Path) -> None:
    manifest = evaluation_gate.read_manifest(model_tar, None)
    assert evaluation_gate.evaluation(manifest, "tiny") == Evaluation("tiny", "tiny", None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no model_manifest.json in the archive"),
        (b"not json", "unreadable model archive"),
        (b"[1, 2]", "model_manifest.json is not a JSON object"),
    ],
)
def test_archives_without_a_usable_manifest_are_one_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "model.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        if content is not None:
            info = tarfile.TarInfo(f"./{MANIFEST}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    with pytest.raises(DeploymentError, match=message):
        evaluation_gate.read_manifest(path, None)
    (tmp_path / "plain.tar.gz").write_bytes(b"plainly not gzip")
    with pytest.raises(DeploymentError, match="unreadable model archive"):
        evaluation_gate.read_manifest(tmp_path / "plain.tar.gz", None)
    with pytest.raises(DeploymentError, match="cannot read the model archive"):
        evaluation_gate.read_manifest(tmp_path / "missing.tar.gz", None)


@pytest.mark.parametrize("value", [True, "0.3", float("nan"), None, [0.3]])
def test_an_evaluation_that_is_not_a_number_counts_as_missing(value: object) -> None:
    manifest = {"dataset": "d", "extra": {"evaluation": {"ndcg@10": value}}}
    assert evaluation_gate.evaluation(manifest, "m").ndcg_at_10 is None


def test_the_comparison() -> None:
    live = Evaluation("live", "ml-1m", 0.30)
    assert evaluation_gate.problem("v", Evaluation("new", "ml-1m", 0.295), live, 0.005) is None  # at the edge
    assert evaluation_gate.problem("v", Evaluation("new", "ml-1m", 0.2949), live, 0.005) == (
        "v: new model NDCG@10 0.2949 < live 0.3000 - tolerance 0.005"
    )
    assert "the live model's manifest has no" in str(
        evaluation_gate.problem("v", Evaluation("new", "ml-1m", 0.4), Evaluation("live", "ml-1m", None), 0.0)
    )


def test_check_joins_every_variants_problem_into_one_line(tmp_path: Path) -> None:
    good, bad = manifest_tar(tmp_path / "good.tar.gz", 0.3), manifest_tar(tmp_path / "bad.tar.gz", 0.1)
    cases = [GateCase("a", bad, str(good)), GateCase("b", good, str(good)), GateCase("c", bad, str(good))]
    with pytest.raises(GateRefusal) as refused:
        evaluation_gate.check(None, cases, 0.005, force=False)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("evaluation gate: a: new model NDCG@10 0.1000 < live 0.3000 - tolerance 0.005; c: ")
    evaluation_gate.check(None, cases, 0.005, force=True)  # overridden: no exception
