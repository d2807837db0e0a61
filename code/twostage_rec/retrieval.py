"""Dot-product retrieval with masking before top-k, exact or through the IVF index.

The dense candidate sources (MF, the sequence model) score query vectors against item vectors
with one of these. Both retrievers return exactly ``n`` candidates whenever at least ``n`` items
are neither blocked (seen, excluded) nor filtered out. :func:`make_retriever` picks one per the
manifest and the settings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from twostage_rec import schema
from twostage_rec.ann import REFERENCE_DEPTH, IvfIndex, probes_for
from twostage_rec.artifact import ModelArtifact
from twostage_rec.request import Filters
from twostage_rec.settings import Settings

logger = logging.getLogger(__name__)

# Scores held at once by one matrix product (32 MB of float32): a whole 100-user batch is one
# product on ML-1M's 3,706 items, 8 users at a time on a 1M-item catalog.
_SCORE_BUDGET = 8 * 1024 * 1024
# top_n_rows sorts a matrix at once from this many rows on (measured crossover: ~6 rows of 3,706).
_MIN_ROWS = 8
# Past half the cells a scan (a Python loop over cells) costs about what the exact product does.
_MAX_PROBE_SHARE = 0.5
# When masks and filters leave fewer items than this share, the answer sits deep in the ranking
# (where a scan's recall is weakest) and scoring just the items left, exactly, is as cheap.
_EXACT_BELOW_SHARE = 0.05


@dataclass(frozen=True)
class Candidates:
    """Retrieved items for one user, best first."""

    item_idx: np.ndarray  # int64
    score: np.ndarray  # float32, same order


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
    """Scores all items with one matrix product per chunk of queries and keeps the best N allowed."""

    def __init__(self, item_vectors: np.ndarray) -> None:
        self._items = item_vectors

    def top(
        self,
        vectors: np.ndarray,
        n: Sequence[int],
        blocked: Sequence[np.ndarray],
        allowed: Sequence[np.ndarray | None],
    ) -> list[Candidates]:
        """Top ``n[q]`` items for each query vector; blocked and disallowed items never appear."""
        out: list[Candidates] = []
        per_product = max(1, _SCORE_BUDGET // max(1, self._items.shape[0]))
        for first in range(0, len(vectors), per_product):
            scores = np.asarray(vectors[first : first + per_product] @ self._items.T, dtype=np.float32)
            chunk = range(first, first + len(scores))
            mask_rows(scores, [blocked[q] for q in chunk], [allowed[q] for q in chunk])
            out.extend(top_n_rows(scores, [n[q] for q in chunk]))
        return out


class AnnRetriever:
    """Top N from the IVF index; exact for any query the index cannot serve with confidence.

    Blocked and filtered items are dropped from the scanned cells before the top-n, so a scan
    either holds N allowed items or is retried on twice the cells; past half the cells the query
    is scored exactly instead. When masks and filters leave under 5% of the catalog, only the
    items left are scored, exactly.
    """

    def __init__(self, item_vectors: np.ndarray, index: IvfIndex, n_probe: int) -> None:
        self._exact = ExactRetriever(item_vectors)
        self._items = item_vectors
        self._n_items = len(item_vectors)
        # The small arrays copied into memory; the large ones stay shared memory maps, seen as
        # plain ndarrays (slicing a np.memmap costs a Python-level subclass hook per cell).
        self._index = IvfIndex(
            centroids=np.array(index.centroids),
            list_offsets=np.array(index.list_offsets),
            item_idx=np.asarray(index.item_idx),
            vectors=np.asarray(index.vectors),
        )
        self._n_probe = n_probe
        self._max_probe = max(1, math.floor(_MAX_PROBE_SHARE * index.n_lists))

    def top(
        self,
        vectors: np.ndarray,
        n: Sequence[int],
        blocked: Sequence[np.ndarray],
        allowed: Sequence[np.ndarray | None],
    ) -> list[Candidates]:
        """Top ``n[q]`` items for each query vector; blocked and disallowed items never appear."""
        out: list[Candidates | None] = [
            self._search(vectors[q], n[q], blocked[q], allowed[q]) for q in range(len(vectors))
        ]
        fallback = [q for q, c in enumerate(out) if c is None]
        if fallback:
            exact = self._exact.top(
                vectors[fallback], [n[q] for q in fallback], [blocked[q] for q in fallback],
                [allowed[q] for q in fallback],
            )
            for q, c in zip(fallback, exact):
                out[q] = c
        return [c for c in out if c is not None]

    def _search(
        self, vector: np.ndarray, n: int, blocked_idx: np.ndarray, allowed: np.ndarray | None
    ) -> Candidates | None:
        """The approximate top n, or ``None`` when only the exact product can answer."""
        blocked = np.zeros(self._n_items, dtype=bool) if allowed is None else ~allowed
        blocked[blocked_idx] = True
        n_left = self._n_items - np.count_nonzero(blocked)
        if n_left < max(n, _EXACT_BELOW_SHARE * self._n_items):
            left = np.flatnonzero(~blocked)
            return top_n(self._items[left] @ vector, n, left)
        # The answer sits deeper when masked items occupy the top: scan more cells for it.
        depth = (n + len(blocked_idx)) * self._n_items / n_left
        n_probe = probes_for(self._n_probe, depth)
        while n_probe <= self._max_probe:
            item_idx, scores = self._index.scan(vector, n_probe)
            scores[blocked[item_idx]] = -np.inf
            found = top_n(scores, n, item_idx)
            if len(found.item_idx) == n:
                return found
            n_probe *= 2  # the scanned cells held fewer than n allowed items
        return None


Retriever = ExactRetriever | AnnRetriever


def make_retriever(
    item_vectors: np.ndarray, index: IvfIndex | None, meta: object, settings: Settings, what: str
) -> Retriever:
    """The IVF retriever for a catalog of at least ``ANN_MIN_ITEMS`` items whose index met
    ``ANN_MIN_RECALL`` at packaging time; the exact one otherwise (saying why in one log line).

    ``meta`` is the index's entry in the manifest (``n_probe``, the measured recall); ``what``
    names the vectors in the log ("MF", "sequence").
    """
    n_items = len(item_vectors)
    if index is None or n_items < settings.ann_min_items:
        return ExactRetriever(item_vectors)
    recall = meta.get(f"recall_at_{REFERENCE_DEPTH}") if isinstance(meta, dict) else None
    if not isinstance(recall, (int, float)) or recall < settings.ann_min_recall:
        logger.warning(
            "%s retrieval: exact over %d items, not the ANN index: "
            "its recall@%d at packaging was %s, below ANN_MIN_RECALL=%g",
            what, n_items, REFERENCE_DEPTH, recall, settings.ann_min_recall,
        )
        return ExactRetriever(item_vectors)
    n_probe = settings.ann_n_probe or int(meta.get("n_probe", 0)) or max(1, index.n_lists // 8)  # type: ignore[union-attr]
    logger.info(
        "%s retrieval: ANN index over %d items, %d of %d cells per query (recall@%d %.3f at packaging)",
        what, n_items, n_probe, index.n_lists, REFERENCE_DEPTH, recall,
    )
    return AnnRetriever(item_vectors, index, n_probe)


def top_n(scores: np.ndarray, n: int, item_idx: np.ndarray | None = None) -> Candidates:
    """The ``n`` largest finite scores, best first; ties go to the lower item index.

    ``item_idx`` names the item of each score (default: its position).
    """
    if n <= 0:
        return Candidates(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))
    pool = _likely_top(scores, n)
    if pool is None:
        pool = np.flatnonzero(np.isfinite(scores))
    pool_scores = scores[pool]
    if len(pool) > n:
        kth = np.partition(pool_scores, len(pool) - n)[len(pool) - n]
        keep = pool_scores >= kth  # every tie with the n-th score stays for the tie rule below
        pool, pool_scores = pool[keep], pool_scores[keep]
    ids = pool if item_idx is None else item_idx[pool]
    # lexsort: last key is primary -> score descending, then item index ascending.
    order = np.lexsort((ids, -pool_scores))[:n]
    return Candidates(item_idx=ids[order].astype(np.int64), score=pool_scores[order].astype(np.float32))


def top_n_rows(scores: np.ndarray, n: Sequence[int]) -> list[Candidates]:
    """:func:`top_n` of each row of the 2-D ``scores`` (``n[r]`` for row ``r``): the same
    items, scores and order, from one partition, one comparison and one sort over the whole matrix
    instead of a top-n call per row (exact retrieval of 100 ML-1M users, 3,706 items: 7.3 ->
    4.0 ms). Overwrites the non-finite scores with -inf.

    Below ``_MIN_ROWS`` rows (its dozen numpy calls cost more than the per-row calls they
    replace: one row took 0.16 ms against 0.03 ms) and on catalogs where :func:`top_n` would
    threshold by a sample (``_likely_top``: a full partition costs more there), it is
    :func:`top_n` row by row.
    """
    rows, width = scores.shape
    if rows < _MIN_ROWS:
        return [top_n(row, m) for row, m in zip(scores, n)]
    want = np.minimum(np.asarray(n, dtype=np.int64).reshape(rows), width)
    k = int(want.max(initial=0))
    if k <= 0 or width >= _likely_top_min_width(k):
        return [top_n(scores[r], int(want[r])) for r in range(rows)]
    np.copyto(scores, -np.inf, where=~np.isfinite(scores))
    # Each row's k-th best score (for the largest n), raised to the lowest finite float32 so that
    # -inf (blocked, filtered, non-finite) never passes: what stays is a superset of every row's
    # top n[r] with every tie at the cut, as in top_n.
    floor = np.float32(-np.finfo(np.float32).max)
    kth = np.partition(scores, width - k, axis=1)[:, width - k] if k < width else np.full(rows, floor)
    # Flat positions come out by row, then item index. Each row's kept scores go left-aligned
    # into a (rows, most kept) matrix padded with -inf; one stable sort along the rows orders them
    # by score, equal scores keeping their item order. (np.nonzero on the 2-D mask and one 3-key
    # lexsort over all kept entries took ~4x as long.)
    flat = np.flatnonzero(scores >= np.maximum(kth, floor)[:, None])
    row, col = np.divmod(flat, width)
    counts = np.bincount(row, minlength=rows)
    slot = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
    negated = np.full((rows, int(counts.max())), np.inf, dtype=np.float32)  # -score: ascending = best first
    negated[row, slot] = -scores.ravel()[flat]
    items = np.zeros(negated.shape, dtype=np.int64)
    items[row, slot] = col
    order = np.argsort(negated, axis=1, kind="stable")
    items = np.take_along_axis(items, order, axis=1)
    best = -np.take_along_axis(negated, order, axis=1)
    take = np.minimum(counts, want)
    return [Candidates(item_idx=items[r, : take[r]], score=best[r, : take[r]]) for r in range(rows)]


def mask_rows(scores: np.ndarray, blocked: Sequence[np.ndarray], allowed: Sequence[np.ndarray | None]) -> None:
    """Sets row ``r`` of the 2-D ``scores`` to -inf at ``blocked[r]`` and where ``allowed[r]`` is False."""
    # Row by row: one concatenated 2-D index measured slower, at 1 row and at 100.
    for row, items, mask in zip(scores, blocked, allowed):
        if len(items):
            row[items] = -np.inf
        if mask is not None:
            row[~mask] = -np.inf


def _likely_top_min_width(n: int) -> int:
    """The catalog size from which :func:`_likely_top` thresholds by a sample."""
    return 64 * max(n, 64)


def _likely_top(scores: np.ndarray, n: int) -> np.ndarray | None:
    """Positions of a small superset of the top ``n`` (about 4n of them), or ``None``.

    A full partition of 1M scores costs ~2 ms; a threshold from a strided sample and one
    comparison cost ~0.3 ms. Exact either way: if at least n scores reach the threshold t, the
    top n all do, so the superset holds them; otherwise the caller takes every score.
    """
    stride = max(1, n // 4)
    if len(scores) < _likely_top_min_width(n):
        return None
    sample = scores[::stride]
    rank = 16  # the 16th best of the sample: ~16 * stride = 4n scores above it on average
    threshold = np.partition(sample, len(sample) - rank)[len(sample) - rank]
    if not np.isfinite(threshold):
        return None
    pool = np.flatnonzero(scores >= threshold)
    pool = pool[np.isfinite(scores[pool])]  # +inf passes the threshold; top_n keeps finite scores only
    return pool if len(pool) >= n else None


def _column(matrix: np.ndarray, names: Sequence[str], name: str) -> np.ndarray | None:
    if name not in names:
        return None
    return np.ascontiguousarray(matrix[:, list(names).index(name)], dtype=np.float32)
