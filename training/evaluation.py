"""Full-ranking evaluation of every model on one held-out period: no sampled negatives.

A :class:`Period` is one held-out interaction per user (the validation or the test item) with the
user's history before it. Every model ranks all items the user has not interacted with; a ranking
is an int array (n_queries, depth) of item indices, best first, -1 where a model has nothing more
to say. :func:`report` turns a ranking into HR@10, NDCG@10, Recall@100 and coverage@10, with the
standard error of each mean over users.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from training import metrics as m
from training.interactions import Encoded, Histories
from twostage_rec.history import UserHistory
from twostage_rec.sources import CandidateSource, Query, SourceResult
from twostage_rec.sources.merge import CandidateMerger, MergedCandidates

K = 10
DEPTH = 100  # stage-1 candidates, and the depth of every ranking
# Users x items scored at once by the report's dense baselines (:func:`dense_chunk`): 32 MB of
# float32 scores, whatever the catalog. With the top-k's int64 indices and the scorer's
# temporaries a block of a 100k-item catalog peaked at 104 MB (tracemalloc; MF's and SVD's
# scorers alike), 512 users at once at 636 MB.
DENSE_BLOCK_CELLS = 1 << 23


@dataclass(frozen=True)
class Period:
    """Queries: ``user_idx[q]`` interacted with ``target[q]`` at ``at_time[q]``, after its history.

    A query's history is the user's row of ``histories``, or only its first ``prefix[q]``
    interactions when ``prefix`` is given (several queries per user at successive positions).
    """

    user_idx: np.ndarray  # int64
    target: np.ndarray  # int64
    at_time: np.ndarray  # int64
    histories: Histories  # the interactions before the queries (blocked: never recommended)
    history_length: int  # how much of the history the history-aware models read
    rating: np.ndarray | None = None  # float32 rating of the held-out item, when known
    prefix: np.ndarray | None = None  # int64 interactions of the user's row before each query

    @classmethod
    def positions(cls, histories: Histories, last: int, history_length: int, min_prefix: int = 1) -> Period:
        """One query for each of every user's ``last`` interactions, with the interactions
        before it as history (users with fewer than ``min_prefix`` before all of them are left out)."""
        lengths = histories.lengths
        users, positions = [], []
        for offset in range(last, 0, -1):
            eligible = np.flatnonzero(lengths - offset >= min_prefix)
            users.append(eligible)
            positions.append(lengths[eligible] - offset)
        user_idx, prefix = np.concatenate(users), np.concatenate(positions)
        order = np.lexsort((prefix, user_idx))
        user_idx, prefix = user_idx[order], prefix[order]
        rows = histories.indptr[user_idx] + prefix
        return cls(
            user_idx.astype(np.int64),
            histories.items[rows],
            histories.timestamps[rows],
            histories,
            history_length,
            histories.ratings[rows],
            prefix.astype(np.int64),
        )

    @classmethod
    def of(cls, held_out: Encoded, before: Histories, history_length: int) -> Period:
        order = np.argsort(held_out.user_idx, kind="stable")
        return cls(
            held_out.user_idx[order],
            held_out.item_idx[order],
            held_out.timestamp[order],
            before,
            history_length,
            held_out.rating[order],
        )

    def __len__(self) -> int:
        return len(self.user_idx)

    def sample(self, n: int, seed: int = 0) -> Period:
        """A seeded subset of ``n`` queries (all of them when there are fewer)."""
        if n >= len(self):
            return self
        return self.subset(np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False)))

    def subset(self, rows: np.ndarray) -> Period:
        rating = None if self.rating is None else self.rating[rows]
        prefix = None if self.prefix is None else self.prefix[rows]
        return Period(
            self.user_idx[rows],
            self.target[rows],
            self.at_time[rows],
            self.histories,
            self.history_length,
            rating,
            prefix,
        )

    def history_bounds(self, q: int) -> tuple[int, int]:
        """(start, end) of query ``q``'s history in ``histories.items``."""
        u = int(self.user_idx[q])
        start = int(self.histories.indptr[u])
        end = int(self.histories.indptr[u + 1]) if self.prefix is None else start + int(self.prefix[q])
        return start, end

    def queries(self, n: int = DEPTH, known_users: bool = True) -> list[Query]:
        """Serving's view of each query: its history, everything it must not get back, ``n``.

        ``known_users=False`` hides the user index (a user the model was not trained on).
        """
        h = self.histories
        out = []
        for q, u in enumerate(self.user_idx.tolist()):
            start, end = self.history_bounds(q)
            recent = max(start, end - self.history_length)
            history = UserHistory(h.items[recent:end], h.timestamps[recent:end])
            out.append(Query(u if known_users else -1, history, h.items[start:end], None, n))
        return out


def rank_dense(
    period: Period, scores: Callable[[np.ndarray], np.ndarray], depth: int = DEPTH, chunk: int | None = None
) -> np.ndarray:
    """Ranking by a dense scorer: ``scores(user_idx)`` gives (len(user_idx), n_items) scores.

    ``chunk`` users are scored at once; None: the first user alone, then blocks of
    :func:`dense_chunk` of the catalog's width, so a block's scores stay bounded whatever the catalog.
    """
    if period.prefix is not None:
        raise ValueError("rank_dense scores whole histories; a period of prefixes needs the sources")
    out = []
    h = period.histories
    start = 0
    while start < len(period):
        users = period.user_idx[start : start + (chunk or 1)]
        start += len(users)
        s = np.array(scores(users), dtype=np.float32)
        rows, cols = m.csr_rows(h.indptr, h.items, users)
        s[rows, cols] = -np.inf
        out.append(m.top_k_rows(s, min(depth, s.shape[1])))
        chunk = chunk or dense_chunk(s.shape[1])
    ranking = np.vstack(out)
    return _pad(ranking, depth)


def dense_chunk(n_items: int, cells: int = DENSE_BLOCK_CELLS, most: int = 512) -> int:
    """Users per :func:`rank_dense` block so that a block has at most ``cells`` scores (at least one user)."""
    return max(1, min(most, cells // max(1, n_items)))


def rank_source(period: Period, source: CandidateSource, depth: int = DEPTH) -> np.ndarray:
    """Ranking of one candidate source alone (how the recent-item kNN and sequence baselines are scored)."""
    return run_sources(period, [source], depth).ranking(source.name, depth)


@dataclass(frozen=True)
class SourceRun:
    """Every source's results for every query of a period (computed once, merged many ways)."""

    queries: list[Query]
    results: dict[str, list[SourceResult]]

    def ranking(self, name: str, depth: int = DEPTH) -> np.ndarray:
        """One source's own ranking (its list, best first)."""
        ranking = np.full((len(self.queries), depth), -1, dtype=np.int64)
        for row, result in enumerate(self.results[name]):
            ranking[row, : min(depth, len(result.item_idx))] = result.item_idx[:depth]
        return ranking

    def merged(self, merger: CandidateMerger, without: str | None = None) -> list[MergedCandidates]:
        """The merger's candidates, optionally as if source ``without`` did not exist."""
        results = {name: r for name, r in self.results.items() if name != without}
        return merger.merge(self.queries, results)


def run_sources(period: Period, sources: Sequence[CandidateSource], depth: int = DEPTH, chunk: int = 256) -> SourceRun:
    """Stage 1's sources as serving runs them, over every query of ``period``."""
    queries = period.queries(depth)
    results: dict[str, list[SourceResult]] = {s.name: [] for s in sources}
    for start in range(0, len(queries), chunk):
        batch = queries[start : start + chunk]
        for source in sources:
            results[source.name].extend(source.run(batch))
    return SourceRun(queries, results)


def candidates_ranking(merged: Sequence[MergedCandidates], depth: int = DEPTH) -> np.ndarray:
    """Stage 1's merged order (fusion score) as a ranking."""
    ranking = np.full((len(merged), depth), -1, dtype=np.int64)
    for row, c in enumerate(merged):
        ranking[row, : min(depth, len(c.item_idx))] = c.item_idx[:depth]
    return ranking


def reranked(merged: Sequence[MergedCandidates], scores: np.ndarray, depth: int = DEPTH) -> np.ndarray:
    """The candidates ordered by ``scores`` (one per candidate, queries one after the other)."""
    ranking = np.full((len(merged), depth), -1, dtype=np.int64)
    start = 0
    for row, c in enumerate(merged):
        end = start + len(c.item_idx)
        order = np.argsort(-scores[start:end], kind="stable")[:depth]
        ranking[row, : len(order)] = c.item_idx[order]
        start = end
    return ranking


def report(ranking: np.ndarray, target: np.ndarray, n_items: int) -> dict[str, float]:
    """HR@10, NDCG@10, Recall@100 and coverage@10, each mean with its standard error (``*_se``)."""
    depth = ranking.shape[1]
    rank = m.target_rank(ranking, target, depth)
    rank = np.where(rank < depth, rank, np.iinfo(np.int64).max)  # absent: below every cut-off
    hit10 = (rank < K).astype(np.float64)
    ndcg10 = np.where(rank < K, 1.0 / np.log2(np.minimum(rank, K) + 2.0), 0.0)
    recall = (rank < DEPTH).astype(np.float64)
    out: dict[str, float] = {}
    for name, values in (("hr@10", hit10), ("ndcg@10", ndcg10), (f"recall@{DEPTH}", recall)):
        out[name] = float(values.mean())
        out[f"{name}_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    out["coverage@10"] = m.coverage_at_k(ranking, n_items, K)
    return out


def ndcg_at_10(ranking: np.ndarray, target: np.ndarray) -> float:
    return m.ndcg_at_k(ranking, target, K)


def per_user_ndcg(ranking: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each query's NDCG@10 (0 when its item is not in the top 10)."""
    depth = min(K, ranking.shape[1])
    rank = m.target_rank(ranking, target, depth)  # depth when absent
    return np.where(rank < depth, 1.0 / np.log2(rank + 2.0), 0.0)


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of ``a - b`` over the same users and its standard error: the honest way to compare two
    models on one test set (far tighter than comparing their separate error bars)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return {"mean": float(diff.mean()), "se": se}


def recall_curve(ranking: np.ndarray, target: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k for each k (at most the ranking depth): the stage-1 plots' curves."""
    rank = m.target_rank(ranking, target, ranking.shape[1])
    return {int(k): float(np.mean(rank < k)) for k in ks if k <= ranking.shape[1]}


def _pad(ranking: np.ndarray, depth: int) -> np.ndarray:
    if ranking.shape[1] >= depth:
        return ranking.astype(np.int64)
    out = np.full((len(ranking), depth), -1, dtype=np.int64)
    out[:, : ranking.shape[1]] = ranking
    return out
