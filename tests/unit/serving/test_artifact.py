"""The artifact refuses to load anything incomplete, corrupt or inconsistent, with one line."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from twostage_rec import artifact as art
from twostage_rec.artifact import ArtifactError, load_artifact, pack_model_tar


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_loads_memory_mapped_and_read_only(tiny_model_dir: Path) -> None:
    a = load_artifact(tiny_model_dir)
    assert isinstance(a.item_factors, np.memmap) and not a.item_factors.flags.writeable
    assert a.manifest.format_version == art.FORMAT_VERSION
    assert set(a.manifest.files) >= set(art.REQUIRED_FILES)


def _one_line(exc: pytest.ExceptionInfo[ArtifactError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_file(model_copy: Path) -> None:
    (model_copy / art.RANKER).unlink()
    with pytest.raises(ArtifactError) as exc:
        load_artifact(model_copy)
    assert "ranker.ubj" in _one_line(exc) and "missing" in str(exc.value)


def test_sha_mismatch(model_copy: Path) -> None:
    path = model_copy / art.ITEM_FACTORS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as exc:
        load_artifact(model_copy)
    assert "sha256 mismatch" in _one_line(exc)


def test_truncated_npy_without_checksums(model_copy: Path) -> None:
    path = model_copy / art.USER_FACTORS
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError) as exc:
        load_artifact(model_copy, verify_checksums=False)
    assert "user_factors.npy" in _one_line(exc)


def test_wrong_dimensions(model_copy: Path) -> None:
    np.save(model_copy / art.ITEM_FACTORS, np.zeros((6, 3), dtype=np.float32))
    with pytest.raises(ArtifactError) as exc:
        load_artifact(model_copy, verify_checksums=False)
    assert "shape" in _one_line(exc)


def test_values_are_scanned_unless_serve_has_verified_the_files(model_copy: Path) -> None:
    from twostage_rec.recommender import TwoStageRecommender

    items = np.load(model_copy / art.NEIGHBOUR_ITEMS, allow_pickle=False)
    items[0] = 99
    np.save(model_copy / art.NEIGHBOUR_ITEMS, items, allow_pickle=False)
    with pytest.raises(ArtifactError) as exc:
        load_artifact(model_copy, verify_checksums=False, check_values=True)
    assert "neighbour_items.npy: item index out of range [0, 6)" in _one_line(exc)
    with pytest.raises(ArtifactError, match="item index out of range"):
        TwoStageRecommender.from_model_dir(model_copy)  # in-process use: nothing verified it before
    # A model-server worker, after serve verified every file: shapes only, no pass over the rows.
    assert load_artifact(model_copy, verify_checksums=False).neighbour_items[0] == 99


def test_newer_format_version(model_copy: Path) -> None:
    path = model_copy / art.MANIFEST
    body = json.loads(path.read_text())
    body["format_version"] = art.FORMAT_VERSION + 1
    path.write_text(json.dumps(body))
    with pytest.raises(ArtifactError) as exc:
        load_artifact(model_copy)
    assert "format_version" in _one_line(exc)


def test_pickled_array_is_refused(model_copy: Path) -> None:
    np.save(model_copy / art.POPULAR_ITEMS, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ArtifactError):
        load_artifact(model_copy, verify_checksums=False)


def test_tarball_has_files_at_root(tiny_model_dir: Path, tmp_path: Path) -> None:
    tar_path = pack_model_tar(tiny_model_dir, tmp_path / "model.tar.gz")
    with tarfile.open(tar_path) as archive:
        names = set(archive.getnames())
    assert art.MANIFEST in names and all("/" not in n for n in names)


def test_sha256_files_matches_one_file_at_a_time(tmp_path: Path) -> None:
    from twostage_rec.artifact import sha256_file, sha256_files

    paths = []
    for n, size in enumerate((0, 10, 3 << 20, 5000)):
        path = tmp_path / f"f{n}.bin"
        path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        paths.append(path)
    assert sha256_files(paths) == {p.name: sha256_file(p) for p in paths}
    assert sha256_files([]) == {}
