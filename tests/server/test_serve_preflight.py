"""``serve`` refuses to start MMS, with one line on stderr, when the model or settings are bad."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.server.harness import run_serve
from twostage_rec import artifact


def assert_refused(base_dir: Path, mentions: str, **env: str) -> None:
    result = run_serve(base_dir, **env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serve: "), result.stderr
    assert mentions in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (base_dir / ".sagemaker" / "config.properties").exists()  # MMS was never configured


@pytest.fixture
def model_copy(tmp_path: Path, tiny_model_dir: Path) -> Path:
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    return tmp_path / "model"


def test_missing_model_dir(tmp_path: Path) -> None:
    assert_refused(tmp_path, str(tmp_path / "model"))


def test_corrupt_file_fails_its_checksum(model_copy: Path) -> None:
    path = model_copy / artifact.ITEM_FACTORS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last float: still a valid .npy, wrong numbers
    path.write_bytes(bytes(data))
    assert_refused(model_copy.parent, f"{artifact.ITEM_FACTORS}: sha256 mismatch")


def test_missing_manifest(model_copy: Path) -> None:
    (model_copy / artifact.MANIFEST).unlink()
    assert_refused(model_copy.parent, artifact.MANIFEST)


def test_legacy_mms_manifest_is_refused(model_copy: Path) -> None:
    (model_copy / "code").mkdir()
    (model_copy / "code" / "MANIFEST.json").write_text("{}")
    assert_refused(model_copy.parent, "MANIFEST.json")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FEATURE_SOURCE", "bogus"),
        ("MAX_REQUEST_BYTES", "lots"),
        ("SAGEMAKER_MODEL_SERVER_WORKERS", "0"),
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", "1.5"),
        ("SAGEMAKER_BIND_TO_PORT", "40000"),  # MMS refuses ports above 32766
    ],
)
def test_bad_setting(model_copy: Path, name: str, value: str) -> None:
    assert_refused(model_copy.parent, name, **{name: value})
