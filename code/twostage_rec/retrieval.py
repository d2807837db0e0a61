"""Stage 1: exact dot-product retrieval over every item, with masking before top-k."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from twostage_rec import schema
from twostage_rec.artifact import ModelArtifact
from twostage_rec.request import Filters


@dataclass(frozen=True)
class Candidates:
    """Retrieved items for one user, best first."""

    item_idx: np.ndarray  # int64
    mf_score: np.ndarray  # float32, same order


class ItemFilter:
    """Builds the boolean 'allowed' mask for category and price filters from the artifact snapshot."""

    def __init__(self, artifact: ModelArtifact) -> None:
        names = artifact.manifest.item_feature_names
        self._n_items = artifact.manifest.n_items
        self._categories = {c: i for i, c in enumerate(artifact.manifest.categories)}
        # Contiguous copies once: a column of the memory-mapped matrix is a strided view.
        self._category_code = _column(artifact.item_features, names, schema.CATEGORY_CODE)
        self._price = _column(artifact.item_features, names, schema.PRICE)

    def allowed(self, filters: Filters) -> np.ndarray | None:
        """``None`` when no filter is active (everything allowed)."""
        if not filters.active:
            return None
        mask = np.ones(self._n_items, dtype=bool)
        if filters.include_categories is not None:
            codes = [self._categories[c] for c in filters.include_categories if c in self._categories]
            mask &= np.isin(self._category_code, codes) if self._category_code is not None else False
        if filters.exclude_categories and self._category_code is not None:
            codes = [self._categories[c] for c in filters.exclude_categories if c in self._categories]
            mask &= ~np.isin(self._category_code, codes)
        if filters.min_price is not None or filters.max_price is not None:
            if self._price is None:
                mask[:] = False
            else:
                # Unknown prices (NaN) fail every price filter: we cannot promise they are in range.
                low = -np.inf if filters.min_price is None else filters.min_price
                high = np.inf if filters.max_price is None else filters.max_price
                mask &= (self._price >= low) & (self._price <= high)
        return mask


class ExactRetriever:
    """Scores all items with one matrix product and keeps the best N the user may see."""

    def __init__(self, artifact: ModelArtifact) -> None:
        self._users = artifact.user_factors
        self._items = artifact.item_factors
        self._indptr = artifact.seen_indptr
        self._indices = artifact.seen_indices
        self._popular = np.asarray(artifact.popular_items, dtype=np.int64)

    def retrieve(
        self,
        user_idx: Sequence[int],
        n: Sequence[int],
        excluded: Sequence[np.ndarray],
        allowed: Sequence[np.ndarray | None],
    ) -> list[Candidates]:
        """Top ``n[i]`` items for each known user; seen, excluded and disallowed items never appear."""
        if not len(user_idx):
            return []
        scores = np.asarray(self._users[np.asarray(user_idx)] @ self._items.T, dtype=np.float32)
        out = []
        for row, u in enumerate(user_idx):
            s = scores[row]
            s[self._indices[self._indptr[u] : self._indptr[u + 1]]] = -np.inf
            if len(excluded[row]):
                s[excluded[row]] = -np.inf
            if allowed[row] is not None:
                s[~allowed[row]] = -np.inf
            out.append(top_n(s, n[row]))
        return out

    def popular(self, n: int, excluded: np.ndarray, allowed: np.ndarray | None) -> Candidates:
        """Most popular items that pass the exclusions and filters (the cold-start fallback)."""
        keep = np.ones(len(self._popular), dtype=bool)
        if len(excluded):
            keep &= ~np.isin(self._popular, excluded)
        if allowed is not None:
            keep &= allowed[self._popular]
        chosen = self._popular[keep][:n]
        return Candidates(item_idx=chosen, mf_score=np.full(len(chosen), np.nan, dtype=np.float32))


def top_n(scores: np.ndarray, n: int) -> Candidates:
    """Indices of the ``n`` largest finite scores, best first; ties go to the lower index."""
    valid = int(np.isfinite(scores).sum())
    n = min(n, valid)
    if n == 0:
        return Candidates(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))
    if n < len(scores):
        part = np.argpartition(-scores, n - 1)[:n]
    else:
        part = np.arange(len(scores))
    # lexsort: last key is primary -> score descending, then index ascending for stable ties.
    order = np.lexsort((part, -scores[part]))
    chosen = part[order][:n]
    chosen = chosen[np.isfinite(scores[chosen])]
    return Candidates(item_idx=chosen.astype(np.int64), mf_score=scores[chosen].astype(np.float32))


def _column(matrix: np.ndarray, names: Sequence[str], name: str) -> np.ndarray | None:
    if name not in names:
        return None
    return np.ascontiguousarray(matrix[:, list(names).index(name)], dtype=np.float32)
