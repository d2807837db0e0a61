"""Full-ranking evaluation: every unseen item is a candidate, no sampled negatives.

A ranking is an int32 array of shape (n_users, k) holding item indices best first. Slots a user
cannot fill (fewer than k unseen items) hold -1, so a seen item never appears in a ranking.
Every metric takes exactly one held-out target item per user (temporal leave-last-out).
"""

import numpy as np

# Upper bound on the elements of one chunk's score matrix: a 1M-item catalog is scored 16 users
# at a time (~200 MB peak with the partition indices) while small catalogs use whole chunk_size.
_SCORE_BUDGET = 1 << 24


def top_k_unseen(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    user_idx: np.ndarray,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    k: int,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Rank all items for each user by ``u . v`` and return the best k the user has not seen.

    ``user_idx`` selects rows of ``user_vectors`` and of the seen-items CSR
    (``seen_indptr``, ``seen_indices``). Seen items are masked to -inf before the top-k, so a
    user with at least k unseen items always gets exactly k; missing slots are -1. Equal scores
    rank the lower item index first. Users are scored ``chunk_size`` at a time (fewer for very
    large catalogs) to bound memory. Returns int32 of shape (len(user_idx), k).
    """
    user_vectors = np.asarray(user_vectors)
    item_vectors = np.asarray(item_vectors)
    user_idx = np.asarray(user_idx)
    seen_indptr = np.asarray(seen_indptr)
    seen_indices = np.asarray(seen_indices)
    n_items = item_vectors.shape[0]
    if user_vectors.ndim != 2 or item_vectors.ndim != 2 or user_vectors.shape[1] != item_vectors.shape[1]:
        raise ValueError(
            f"user_vectors {user_vectors.shape} and item_vectors {item_vectors.shape} "
            "must be 2-D with the same number of columns"
        )
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k ({k}) and chunk_size ({chunk_size}) must be >= 1")
    if user_idx.ndim != 1 or not np.issubdtype(user_idx.dtype, np.integer):
        raise ValueError(f"user_idx must be a 1-D integer array, got {user_idx.dtype} {user_idx.shape}")
    if len(user_idx) and (user_idx.min() < 0 or user_idx.max() >= min(len(user_vectors), len(seen_indptr) - 1)):
        raise ValueError(
            f"user_idx out of range: max {user_idx.max()} but {len(user_vectors)} user vectors "
            f"and {len(seen_indptr) - 1} seen-items rows"
        )
    if not (np.isfinite(item_vectors).all() and np.isfinite(user_vectors[user_idx]).all()):
        raise ValueError("user_vectors or item_vectors contain NaN or inf")

    ranked = np.full((len(user_idx), k), -1, dtype=np.int32)
    if n_items == 0:
        return ranked
    kk = min(k, n_items)
    rows_per_chunk = max(1, min(chunk_size, _SCORE_BUDGET // n_items))
    for start in range(0, len(user_idx), rows_per_chunk):
        users = user_idx[start : start + rows_per_chunk]
        scores = user_vectors[users] @ item_vectors.T
        if not np.issubdtype(scores.dtype, np.floating):
            scores = scores.astype(np.float64)  # -inf needs a float array
        seen_rows, seen_cols = csr_rows(seen_indptr, seen_indices, users)
        scores[seen_rows, seen_cols] = -np.inf
        ranked[start : start + len(users), :kk] = top_k_rows(scores, kk)
    return ranked


def csr_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in ``rows``, column) of every stored entry of the selected CSR rows, no Python loop."""
    starts = indptr[rows].astype(np.int64)
    lengths = indptr[rows + 1].astype(np.int64) - starts
    out_rows = np.repeat(np.arange(len(rows)), lengths)
    # Offset of each entry inside its row, plus that row's start in `indices`.
    row_begin = np.cumsum(lengths) - lengths
    positions = np.arange(lengths.sum()) - np.repeat(row_begin, lengths) + np.repeat(starts, lengths)
    return out_rows, indices[positions]


def top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Best k columns of each row, best first; ties go to the lower column; -inf slots become -1."""
    n_cols = scores.shape[1]
    top = np.argpartition(scores, n_cols - k, axis=1)[:, n_cols - k :]
    top_scores = np.take_along_axis(scores, top, axis=1)
    kth_best = top_scores.min(axis=1, keepdims=True)
    # argpartition keeps arbitrary members of a tie at the k-th place. Rows where some tied item
    # was left out are rebuilt so the lower index wins there too; with float MF scores that is rare.
    cut_ties = np.flatnonzero((scores == kth_best).sum(axis=1) > (top_scores == kth_best).sum(axis=1))
    for row in cut_ties:
        above = np.flatnonzero(scores[row] > kth_best[row])
        tied = np.flatnonzero(scores[row] == kth_best[row])
        top[row] = np.concatenate([above, tied[: k - len(above)]])
        top_scores[row] = scores[row, top[row]]
    order = np.lexsort((top, -top_scores))  # sorts each row: score descending, then index
    best = np.take_along_axis(top, order, axis=1).astype(np.int32)
    best[np.take_along_axis(top_scores, order, axis=1) == -np.inf] = -1
    return best


def target_rank(ranked: np.ndarray, target_idx: np.ndarray, k: int) -> np.ndarray:
    """0-based rank of each user's target within the first k slots, k when it is absent."""
    ranked = np.asarray(ranked)
    target_idx = np.asarray(target_idx)
    if ranked.ndim != 2 or target_idx.shape != (ranked.shape[0],):
        raise ValueError(
            f"ranked must be (n_users, k) and target_idx (n_users,), got {ranked.shape} and {target_idx.shape}"
        )
    if not 1 <= k <= ranked.shape[1]:
        raise ValueError(f"k={k} must be between 1 and the ranking width {ranked.shape[1]}")
    if ranked.shape[0] == 0:
        raise ValueError("cannot average a metric over zero users")
    hits = ranked[:, :k] == target_idx[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), k)


def hit_rate_at_k(ranked: np.ndarray, target_idx: np.ndarray, k: int) -> float:
    """Fraction of users whose held-out item is in their top k."""
    return float(np.mean(target_rank(ranked, target_idx, k) < k))


def ndcg_at_k(ranked: np.ndarray, target_idx: np.ndarray, k: int) -> float:
    """Mean NDCG@k with one relevant item: 1/log2(rank + 2) at 0-based rank < k, else 0 (ideal DCG is 1)."""
    rank = target_rank(ranked, target_idx, k)
    return float(np.mean(np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)))


def recall_at_k(ranked: np.ndarray, target_idx: np.ndarray, k: int) -> float:
    """Recall@k; with one held-out item per user it equals the hit rate (reported as stage-1 recall)."""
    return hit_rate_at_k(ranked, target_idx, k)


def coverage_at_k(ranked: np.ndarray, n_items: int, k: int) -> float:
    """Share of the catalog that appears in at least one user's top k."""
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    top = np.asarray(ranked)[:, :k]
    return float(len(np.unique(top[top >= 0])) / n_items)


def popularity_ranking(
    train_item_idx: np.ndarray,
    n_items: int,
    user_idx: np.ndarray,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    k: int,
) -> np.ndarray:
    """The baseline: most-interacted training items first, each user's seen items masked out.

    Same output contract as :func:`top_k_unseen` (ties go to the lower item index).
    """
    train_item_idx = np.asarray(train_item_idx)
    if len(train_item_idx) and (train_item_idx.min() < 0 or train_item_idx.max() >= n_items):
        raise ValueError(f"train_item_idx out of range for n_items={n_items}")
    counts = np.bincount(train_item_idx, minlength=n_items).astype(np.float64)
    # Break count ties by index inside the score itself (exact in float64 below 2**53), so no row
    # takes top_k_unseen's slow path for ties at the cut. Every user vector is 1: u . v is the score.
    counts = counts * n_items + np.arange(n_items - 1, -1, -1)
    ones = np.ones((len(seen_indptr) - 1, 1))
    return top_k_unseen(ones, counts[:, None], user_idx, seen_indptr, seen_indices, k)
