"""External string ids <-> contiguous integer indices, and per-row index sets as CSR arrays."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class IdIndex:
    """Position in ``ids`` is the index of that id."""

    ids: list[str]
    _lookup: pd.Index = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lookup = pd.Index(self.ids, dtype="str")
        if not lookup.is_unique:
            duplicate = lookup[lookup.duplicated()][0]
            raise ValueError(f"IdIndex ids must be unique; {duplicate!r} repeats")
        object.__setattr__(self, "_lookup", lookup)  # frozen dataclass: set once, here

    def idx(self, ids: Sequence[str] | pd.Series) -> np.ndarray:
        """int32 indices of ``ids``; raises KeyError naming the first id not in the index."""
        wanted = pd.Index(ids, dtype="str")
        positions = self._lookup.get_indexer(wanted)
        if (positions < 0).any():
            raise KeyError(f"unknown id {wanted[int(np.argmax(positions < 0))]!r}")
        return positions.astype(np.int32)

    def categorical(self, idx: np.ndarray) -> pd.Categorical:
        """The ids at ``idx`` as a Categorical over this index: no string is copied per row."""
        return pd.Categorical.from_codes(idx, dtype=pd.CategoricalDtype(self._lookup))

    def __len__(self) -> int:
        return len(self.ids)


def build_index(ids: Iterable[str]) -> IdIndex:
    """Index the distinct ``ids`` in sorted order: the same ids always get the same indices."""
    values = ids if isinstance(ids, (pd.Series, np.ndarray, pd.Index)) else list(ids)
    return index_and_encode(pd.Series(values, dtype="str").dropna())[0]


def index_and_encode(ids: pd.Series) -> tuple[IdIndex, np.ndarray]:
    """The distinct ``ids`` indexed in sorted order, and each row's int64 index, from one hash pass.

    The same codes as ``build_index(ids).idx(ids)`` without hashing every row twice; raises
    ValueError on a missing id. A categorical column over sorted categories that every row uses
    (what the loaders return) is already that: its codes are taken as they are, no string hashed.
    """
    if isinstance(ids.dtype, pd.CategoricalDtype):
        index_codes = _sorted_category_codes(ids)
        if index_codes is not None:
            return index_codes
    codes, distinct = pd.factorize(pd.Series(ids, dtype="str"), sort=True)
    if len(codes) and codes.min() < 0:
        raise ValueError(f"ids hold a missing value at row {int(np.argmax(codes < 0))}")
    return IdIndex(distinct.tolist()), codes.astype(np.int64, copy=False)


def _sorted_category_codes(ids: pd.Series) -> tuple[IdIndex, np.ndarray] | None:
    """``index_and_encode`` of a categorical read off its codes, or None where that would not
    give the same answer (categories unsorted, unused or not str; a missing value)."""
    categories = ids.cat.categories
    codes = ids.cat.codes.to_numpy()
    if not (pd.api.types.is_string_dtype(categories.dtype) and categories.is_monotonic_increasing):
        return None
    if len(codes) and codes.min() < 0:
        raise ValueError(f"ids hold a missing value at row {int(np.argmax(codes < 0))}")
    if not np.bincount(codes, minlength=len(categories)).all():
        return None
    return IdIndex(categories.tolist()), codes.astype(np.int64)


def csr_from_pairs(row_idx: np.ndarray, col_idx: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of the (row, col) pairs: ``indptr`` int64 (n_rows + 1), ``indices`` int32 sorted unique per row.

    Duplicate pairs collapse to one; rows without pairs are empty.
    """
    rows = np.asarray(row_idx, dtype=np.int64)
    cols = np.asarray(col_idx, dtype=np.int64)
    if rows.shape != cols.shape or rows.ndim != 1:
        raise ValueError(f"row_idx and col_idx must be 1-D of equal length, got {rows.shape} and {cols.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        raise ValueError(f"row_idx must lie in [0, {n_rows}), got [{rows.min()}, {rows.max()}]")
    if cols.size and (cols.min() < 0 or cols.max() > np.iinfo(np.int32).max):
        raise ValueError(f"col_idx must lie in [0, 2**31), got [{cols.min()}, {cols.max()}]")
    n_cols = int(cols.max()) + 1 if cols.size else 1
    # Sort then drop repeats: np.unique does the same but is ~50x slower here (numpy 2.4).
    pairs = np.sort(rows * n_cols + cols)  # by row, then col
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = pairs[1:] != pairs[:-1]
    pairs = pairs[first]
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs // n_cols, minlength=n_rows), out=indptr[1:])
    return indptr, (pairs % n_cols).astype(np.int32)
