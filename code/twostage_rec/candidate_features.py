"""Stage 2's input: one feature row per candidate, in the manifest's ranker feature order.

Training builds its ranker rows with this same class (``training/ranker_data.py``), so the ranker
learns on exactly what serving computes. A row holds:

- each source's score and rank of the candidate, and the fusion score (``schema.SOURCE_FEATURES``);
- the candidate against the user's recent history (``schema.HISTORY_FEATURES``): co-occurrence and
  item-vector similarity to the last 1, 5 and 20 items, hours since the last interaction, the
  history's length and its share in the candidate's category;
- the user's features (one row per query) and the candidate's item features (one row per candidate).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from twostage_rec import schema
from twostage_rec.sources import DENSE_KEYS, Query, key_positions
from twostage_rec.sources.merge import MergedCandidates
from twostage_rec.sources.neighbours import DENSE_KEYS_PER_ENTRY, NeighbourLists, recent_items

RECENT_WINDOWS = (1, 5, 20)
_COOC = dict(zip(RECENT_WINDOWS, (schema.COOC_LAST_1, schema.COOC_LAST_5, schema.COOC_LAST_20)))
_EMB = dict(zip(RECENT_WINDOWS, (schema.EMB_SIM_LAST_1, schema.EMB_SIM_LAST_5, schema.EMB_SIM_LAST_20)))
_SOURCE_COLUMNS = {
    schema.SOURCE_MF: (schema.MF_SCORE, schema.MF_RANK),
    schema.SOURCE_NEIGHBOURS: (schema.NEIGHBOURS_SCORE, schema.NEIGHBOURS_RANK),
    schema.SOURCE_SEQUENCE: (schema.SEQUENCE_SCORE, schema.SEQUENCE_RANK),
}
_SECONDS_PER_HOUR = 3600.0


class CandidateFeatureBuilder:
    """Builds the ranker matrix for merged candidates."""

    def __init__(
        self,
        feature_names: Sequence[str],
        user_feature_names: Sequence[str],
        item_feature_names: Sequence[str],
        neighbours: NeighbourLists,
        item_vectors: np.ndarray,
        category_code: np.ndarray | None,
        gap_cap_hours: float | None = None,
    ) -> None:
        """``item_vectors`` give the similarity features (the sequence model's when it has one);
        ``category_code`` is each item's category code (NaN unknown), or None without categories;
        ``gap_cap_hours`` bounds the hours since the last interaction (the largest gap the ranker was
        trained on: a request years later cannot leave the range it learnt)."""
        self.names = list(feature_names)
        column = {name: c for c, name in enumerate(self.names)}
        self._user = [(column[n], u) for u, n in enumerate(user_feature_names) if n in column]
        self._item = [(column[n], i) for i, n in enumerate(item_feature_names) if n in column]
        self._column = column
        unknown = set(self.names) - set(schema.CANDIDATE_FEATURES) - set(user_feature_names) - set(item_feature_names)
        if unknown:
            raise ValueError(f"ranker features {sorted(unknown)} are neither candidate, user nor item features")
        self._neighbours = neighbours
        self._vectors = item_vectors
        self._category = category_code
        self._gap_cap = np.inf if gap_cap_hours is None else float(gap_cap_hours)
        self._n_codes = 1 if category_code is None else max(1, int(np.nanmax(category_code, initial=-1)) + 1)

    def matrix(
        self,
        queries: Sequence[Query],
        merged: Sequence[MergedCandidates],
        at_time: Sequence[int],
        user_rows: np.ndarray,
        item_rows: np.ndarray,
    ) -> np.ndarray:
        """float32 (total candidates, n_features), the queries' candidates one after the other.

        ``user_rows`` has one row per query (NaN for a user the model does not know);
        ``item_rows`` one per candidate in the same order as the candidates. Every feature is
        computed for all queries at once (no Python loop over candidates or queries' items).
        """
        lengths = np.array([len(m.item_idx) for m in merged], dtype=np.int64)
        x = np.full((int(lengths.sum()), len(self.names)), np.nan, dtype=np.float32)
        if not len(x):
            return x
        row_query = np.repeat(np.arange(len(merged)), lengths)
        items = np.concatenate([m.item_idx for m in merged]).astype(np.int64)
        for source, (score_name, rank_name) in _SOURCE_COLUMNS.items():
            if source in merged[0].source_scores:
                self._set(x, score_name, np.concatenate([m.source_scores[source] for m in merged]))
                self._set(x, rank_name, np.concatenate([m.source_ranks[source] for m in merged]))
        self._set(x, schema.FUSION_SCORE, np.concatenate([m.fusion_score for m in merged]))
        history_length = np.array([len(q.history) for q in queries], dtype=np.int64)
        self._set(x, schema.HISTORY_LENGTH, history_length[row_query].astype(np.float32))
        self._history_features(x, queries, history_length, row_query, items, np.asarray(at_time, dtype=np.float64))
        for c, u in self._user:
            x[:, c] = np.asarray(user_rows, dtype=np.float32)[row_query, u]
        for c, i in self._item:
            x[:, c] = item_rows[:, i]
        return x

    def _history_features(
        self,
        x: np.ndarray,
        queries: Sequence[Query],
        history_length: np.ndarray,
        row_query: np.ndarray,
        items: np.ndarray,
        at_time: np.ndarray,
    ) -> None:
        """The candidate-vs-history columns; rows of queries without history stay NaN."""
        has_history = history_length[row_query] > 0
        if not has_history.any():
            return
        col = self._column
        recent = recent_items(queries, max(RECENT_WINDOWS))  # most recent first, -1 = none
        if any(_COOC[w] in col for w in RECENT_WINDOWS):
            cooc = self._cooccurrence(recent, row_query, items)
            for k, window in enumerate(RECENT_WINDOWS):
                if _COOC[window] in col:
                    x[:, col[_COOC[window]]] = np.where(has_history, cooc[:, k], np.nan)
        if any(_EMB[w] in col for w in RECENT_WINDOWS):
            similarity = self._similarity(recent, row_query, items)
            for k, window in enumerate(RECENT_WINDOWS):
                if _EMB[window] in col:
                    x[:, col[_EMB[window]]] = np.where(has_history, similarity[:, k], np.nan)
        last_time = np.array(
            [q.history.last_timestamp if len(q.history) else np.nan for q in queries], dtype=np.float64
        )
        hours = np.minimum((at_time - last_time) / _SECONDS_PER_HOUR, self._gap_cap)
        self._set(x, schema.HOURS_SINCE_LAST, hours[row_query].astype(np.float32))
        if self._category is not None and schema.CATEGORY_SHARE in col:
            x[:, col[schema.CATEGORY_SHARE]] = self._category_share(queries, history_length, row_query, items)

    def _cooccurrence(self, recent: np.ndarray, row_query: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(rows, len(RECENT_WINDOWS)): summed neighbour scores from each query's last 1, 5, 20 items."""
        query, age, neighbour, score = self._neighbours.gather(recent)
        if not len(query):
            return np.zeros((len(items), len(RECENT_WINDOWS)), dtype=np.float32)
        n_items, windows = self._neighbours.n_items, len(RECENT_WINDOWS)
        # Only the candidates' sums are read: each entry adds into its candidate's row (entries of
        # other items into one extra row, dropped), in the first window that holds its age; a
        # running sum over the windows then counts it in every later one. (Summing every
        # (query, item) key densely, one pass per window, took ~1.6x as long on ML-1M's
        # 100-user batches.)
        first = np.searchsorted(RECENT_WINDOWS, np.arange(recent.shape[1]), side="right")  # depth = max window
        entries, n_keys = query * n_items + neighbour, len(recent) * n_items
        dense = n_keys <= min(DENSE_KEYS, DENSE_KEYS_PER_ENTRY * len(entries))  # as KeyedSums decides
        row = key_positions(row_query.astype(np.int64) * n_items + items, entries, n_keys, dense)
        # Row 0 takes the entries of non-candidates (position -1), dropped after the sum.
        sums = np.bincount((row + 1) * windows + first[age], weights=score, minlength=(len(items) + 1) * windows)
        return np.cumsum(sums[windows:].reshape(-1, windows), axis=1).astype(np.float32)

    def _similarity(self, recent: np.ndarray, row_query: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(rows, len(RECENT_WINDOWS)): cosine of each candidate to the mean direction of the last 1, 5, 20 items."""
        valid = recent >= 0
        history = _unit(np.asarray(self._vectors[np.where(valid, recent, 0).ravel()], dtype=np.float32))
        history = history.reshape(*recent.shape, -1) * valid[..., None]
        cumulative = np.cumsum(history, axis=1)  # sum of the most recent 1, 2, ... items
        directions = np.stack([cumulative[:, w - 1] for w in RECENT_WINDOWS], axis=1)  # (queries, windows, dim)
        directions = _unit(directions.reshape(-1, directions.shape[-1])).reshape(directions.shape)
        candidates = _unit(np.asarray(self._vectors[items], dtype=np.float32))
        return np.einsum("rd,rwd->rw", candidates, directions[row_query])

    def _category_share(
        self, queries: Sequence[Query], history_length: np.ndarray, row_query: np.ndarray, items: np.ndarray
    ) -> np.ndarray:
        """Share of each query's history in each candidate's category (NaN: unknown category or no history)."""
        assert self._category is not None
        counts = np.zeros((len(queries), self._n_codes), dtype=np.float64)
        owners = np.repeat(np.arange(len(queries)), history_length)
        codes = self._category[np.concatenate([q.history.item_idx for q in queries]).astype(np.int64)]
        known = ~np.isnan(codes)
        np.add.at(counts, (owners[known], codes[known].astype(np.int64)), 1.0)
        candidate_codes = self._category[items]
        share = counts[row_query, np.nan_to_num(candidate_codes, nan=0).astype(np.int64)]
        with np.errstate(invalid="ignore", divide="ignore"):
            share = share / history_length[row_query]
        return np.where(np.isnan(candidate_codes) | (history_length[row_query] == 0), np.nan, share).astype(np.float32)

    def _set(self, x: np.ndarray, name: str, values: np.ndarray | np.floating) -> None:
        if name in self._column:
            x[:, self._column[name]] = values


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)
