"""Id <-> index mapping and CSR construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.indexing import IdIndex, build_index, csr_from_pairs, index_and_encode


def test_build_index_is_sorted_unique_and_order_free() -> None:
    index = build_index(["b", "007", "a", "b", "é", "7"])
    assert index.ids == ["007", "7", "a", "b", "é"] and len(index) == 5
    assert build_index(pd.Series(["a", "b", "007", "é", "7"])).ids == index.ids
    assert build_index(iter(["é", "7", "007", "a", "b"])).ids == index.ids


def test_idx_maps_ids_to_int32_positions() -> None:
    index = build_index(["x", "y", "z"])
    positions = index.idx(["z", "x", "z"])
    assert positions.dtype == np.int32 and positions.tolist() == [2, 0, 2]
    assert index.idx(pd.Series(["y"], index=[7])).tolist() == [1]
    assert index.idx([]).tolist() == []


def test_idx_unknown_id_names_the_first_one() -> None:
    with pytest.raises(KeyError, match="unknown id 'w'"):
        build_index(["x", "y"]).idx(["x", "w", "v"])


def test_id_index_rejects_repeats() -> None:
    with pytest.raises(ValueError, match="'a' repeats"):
        IdIndex(["a", "b", "a"])


def test_index_and_encode_is_build_index_and_idx_in_one_pass() -> None:
    ids = pd.Series(["b", "007", "a", "b", "é", "7", "B", "", "a"], index=range(10, 19))
    index, codes = index_and_encode(ids)
    assert index.ids == build_index(ids).ids == ["", "007", "7", "B", "a", "b", "é"]
    assert codes.dtype == np.int64 and codes.tolist() == build_index(ids).idx(ids).tolist()
    assert index.categorical(codes).tolist() == ids.tolist()
    empty, no_codes = index_and_encode(pd.Series([], dtype="str"))
    assert len(empty) == 0 and no_codes.tolist() == []


def test_index_and_encode_reads_a_sorted_categorical_s_codes_and_falls_back_otherwise() -> None:
    values = ["b", "007", "a", "b", "é", "7", "B", "", "a"]
    want_index, want_codes = index_and_encode(pd.Series(values))
    for categories in (
        sorted(set(values)),  # the loaders' columns: the codes are taken as they are
        ["b", "a", "007", "é", "7", "B", ""],  # unsorted: re-encoded
        [*sorted(set(values)), "unused"],  # a category no row uses would leave a hole
    ):
        ids = pd.Series(pd.Categorical(values, categories=categories))
        index, codes = index_and_encode(ids)
        assert index.ids == want_index.ids and codes.tolist() == want_codes.tolist()
    with pytest.raises(ValueError, match="missing value at row 1"):
        index_and_encode(pd.Series(pd.Categorical(["a", None, "b"], categories=["a", "b"])))


def test_index_and_encode_refuses_a_missing_id() -> None:
    with pytest.raises(ValueError, match="missing value at row 1"):
        index_and_encode(pd.Series(["a", None, "b"]))


def test_csr_sorts_dedups_and_keeps_empty_rows() -> None:
    indptr, indices = csr_from_pairs(np.array([2, 0, 2, 2, 0]), np.array([5, 3, 1, 5, 3]), n_rows=4)
    assert indptr.dtype == np.int64 and indices.dtype == np.int32
    assert indptr.tolist() == [0, 1, 1, 3, 3]
    assert indices.tolist() == [3, 1, 5]


def test_csr_empty_and_bad_input() -> None:
    indptr, indices = csr_from_pairs(np.array([], dtype=np.int32), np.array([], dtype=np.int32), n_rows=2)
    assert indptr.tolist() == [0, 0, 0] and indices.tolist() == []
    with pytest.raises(ValueError, match=r"row_idx must lie in \[0, 2\)"):
        csr_from_pairs(np.array([2]), np.array([0]), n_rows=2)
    with pytest.raises(ValueError, match="equal length"):
        csr_from_pairs(np.array([0, 1]), np.array([0]), n_rows=2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 40)), max_size=80))
def test_csr_matches_a_set_of_pairs(pairs: list[tuple[int, int]]) -> None:
    rows = np.array([r for r, _ in pairs], dtype=np.int64)
    cols = np.array([c for _, c in pairs], dtype=np.int64)
    indptr, indices = csr_from_pairs(rows, cols, n_rows=10)
    for row in range(10):
        assert indices[indptr[row] : indptr[row + 1]].tolist() == sorted({c for r, c in pairs if r == row})
