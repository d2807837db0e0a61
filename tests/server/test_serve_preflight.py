"""``serve`` refuses to start MMS, with one line on stderr, when the model or settings are bad."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.server.harness import run_serve
from tests.support.tiny_model import SEQUENCE_DIM, sequence_model
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


# Bad artifacts that pass the checksum (the manifest re-signed after the damage), so the loader's
# own checks are what refuse them: workers load without checksums, and a model can be built wrong.
def resign(model_dir: Path) -> None:
    path = model_dir / artifact.MANIFEST
    body = json.loads(path.read_text())
    present = [name for name in body["files"] if (model_dir / name).exists()]
    body["files"] = {name: artifact.sha256_file(model_dir / name) for name in present}
    path.write_text(json.dumps(body))


def test_missing_array_file(model_copy: Path) -> None:
    (model_copy / artifact.ITEM_FACTORS).unlink()
    assert_refused(model_copy.parent, f"{artifact.ITEM_FACTORS}: required artifact file is missing")


def test_missing_ranker_file(model_copy: Path) -> None:
    (model_copy / artifact.RANKER).unlink()
    assert_refused(model_copy.parent, artifact.RANKER)


def test_truncated_npy(model_copy: Path) -> None:
    path = model_copy / artifact.USER_FACTORS
    path.write_bytes(path.read_bytes()[:-8])  # an interrupted download or copy
    assert_refused(model_copy.parent, f"{artifact.USER_FACTORS}: sha256 mismatch")
    resign(model_copy)
    assert_refused(model_copy.parent, f"{artifact.USER_FACTORS}: not a readable .npy file")


def test_wrong_dimensions(model_copy: Path) -> None:
    np.save(model_copy / artifact.ITEM_FACTORS, np.zeros((6, 3), dtype=np.float32), allow_pickle=False)
    resign(model_copy)
    assert_refused(model_copy.parent, f"{artifact.ITEM_FACTORS}: shape (6, 3), manifest says (6, 4)")


def test_wrong_dtype(model_copy: Path) -> None:
    np.save(model_copy / artifact.USER_FACTORS, np.zeros((3, 4), dtype=np.float64), allow_pickle=False)
    resign(model_copy)
    assert_refused(model_copy.parent, "dtype float64, expected float32")


def test_pickled_npy_is_refused_not_unpickled(model_copy: Path) -> None:
    np.save(model_copy / artifact.POPULAR_ITEMS, np.array([object()], dtype=object), allow_pickle=True)
    resign(model_copy)
    assert_refused(model_copy.parent, f"{artifact.POPULAR_ITEMS}: not a readable .npy file")


def test_manifest_of_a_newer_format_version(model_copy: Path) -> None:
    path = model_copy / artifact.MANIFEST
    body = json.loads(path.read_text())
    body["format_version"] = artifact.FORMAT_VERSION + 1
    path.write_text(json.dumps(body))
    assert_refused(model_copy.parent, f"format_version {artifact.FORMAT_VERSION + 1} is not supported")


def test_manifest_that_is_not_json(model_copy: Path) -> None:
    (model_copy / artifact.MANIFEST).write_text('{"format_version": 1,')
    assert_refused(model_copy.parent, "unreadable manifest")


def test_garbage_ranker(model_copy: Path) -> None:
    (model_copy / artifact.RANKER).write_bytes(b"not an XGBoost model")
    resign(model_copy)
    assert_refused(model_copy.parent, "preflight")


def test_a_sequence_model_that_does_not_match_the_item_count_is_refused(model_copy: Path) -> None:
    vectors = np.load(model_copy / artifact.SEQUENCE_ITEM_VECTORS, allow_pickle=False)
    np.save(model_copy / artifact.SEQUENCE_ITEM_VECTORS, np.vstack([vectors, vectors[:1]]), allow_pickle=False)
    resign(model_copy)
    assert_refused(model_copy.parent, "the sequence model does not match this catalog")


def test_a_truncated_sequence_graph_is_refused(model_copy: Path) -> None:
    graph = (model_copy / artifact.SEQUENCE_GRAPH).read_bytes()
    (model_copy / artifact.SEQUENCE_GRAPH).write_bytes(graph[: len(graph) // 2])
    resign(model_copy)
    assert_refused(model_copy.parent, "the sequence encoder graph does not load")


def test_a_sequence_graph_of_another_width_is_refused(model_copy: Path) -> None:
    graph, _, _ = sequence_model(dim=SEQUENCE_DIM + 2)
    (model_copy / artifact.SEQUENCE_GRAPH).write_bytes(graph)
    resign(model_copy)
    assert_refused(model_copy.parent, f"graph reads {SEQUENCE_DIM + 2}-dim items, the manifest says {SEQUENCE_DIM}")


def test_neighbour_lists_pointing_outside_the_catalog_are_refused(model_copy: Path) -> None:
    items = np.load(model_copy / artifact.NEIGHBOUR_ITEMS, allow_pickle=False)
    items[0] = 99
    np.save(model_copy / artifact.NEIGHBOUR_ITEMS, items, allow_pickle=False)
    resign(model_copy)
    assert_refused(model_copy.parent, f"{artifact.NEIGHBOUR_ITEMS}: item index out of range")
