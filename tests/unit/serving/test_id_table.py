"""Memory-mappable id tables: positions both ways, unicode, hash collisions, and the artifact's checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from twostage_rec import artifact as art
from twostage_rec import id_table
from twostage_rec.id_table import IdTable, IdTableArrays

IDS = ["alice", "bob", "Zoë", "", "日本", "bob2"]


def test_positions_both_ways() -> None:
    table = IdTable(IdTableArrays.build(IDS))
    assert len(table) == 6 and list(table) == IDS and table[2] == "Zoë" and table[-1] == "bob2"
    assert table[1:3] == ["bob", "Zoë"]
    assert [table.position(i) for i in IDS] == list(range(6))
    assert table.position("carol") == -1 and "carol" not in table and "日本" in table
    assert table.index("bob") == 1
    assert table.positions(["bob", "nope", "日本", "bob"]).tolist() == [1, -1, 4, 1]
    assert table.positions([]).tolist() == []
    with pytest.raises(ValueError):
        table.index("carol")
    with pytest.raises(IndexError):
        table[6]


def test_a_hash_collision_is_resolved_by_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(id_table, "id_hash", lambda value: 42)  # every id collides
    table = IdTable(IdTableArrays.build(IDS))
    assert [table.position(i) for i in IDS] == list(range(6))
    assert table.positions(IDS).tolist() == list(range(6))
    assert table.position("nobody") == -1 and table.positions(["nobody"]).tolist() == [-1]


def test_the_artifact_refuses_a_broken_table(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    a = art.load_artifact(model)
    assert isinstance(a.user_ids, IdTable) and a.user_ids.position("carol") == 2
    offsets_file = art.USER_ID_FILES[1]
    offsets = np.load(model / offsets_file, allow_pickle=False)
    np.save(model / offsets_file, offsets[:-1], allow_pickle=False)  # one id fewer than the manifest says
    with pytest.raises(art.ArtifactError, match="offsets must rise"):
        art.load_artifact(model, verify_checksums=False)
    np.save(model / offsets_file, offsets, allow_pickle=False)
    hashes_file = art.USER_ID_FILES[2]
    np.save(model / hashes_file, np.load(model / hashes_file, allow_pickle=False)[::-1].copy(), allow_pickle=False)
    with pytest.raises(art.ArtifactError, match="not sorted"):
        art.load_artifact(model, verify_checksums=False, check_values=True)
