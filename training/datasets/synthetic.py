"""A seeded latent-factor world: data with known structure, any size, no download.

Two shapes: :func:`generate_synthetic` gives every user the same number of interactions (a
MovieLens-like shape); :func:`generate_long_tail` the Amazon-reviews shape, many users with a few
interactions each and a long tail of items, at a given number of interactions (10M in seconds).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twostage_rec import schema

from .dataset import DataError, Dataset, validate_interactions

_AFFINITY_STD = 1.5  # spread of user.item, in logits: comparable to the popularity term's
_ZIPF_EXPONENT = 1.0  # item popularity ~ 1 / rank
# rating = round(center + slope * user.item + noise), clipped to 1..5: mean ~3.6 and a spread
# close to MovieLens-1M's (sampled items already have high affinity, hence the low center).
_RATING_CENTER = 2.5
_RATING_SLOPE = 0.6
_RATING_NOISE = 0.6
_START = 1_600_000_000  # 2020-09-13, an arbitrary fixed epoch
_MEAN_GAP_SECONDS = 2 * 86_400
_CHUNK_CELLS = 1 << 22  # users x items scored at once: 16 MB of float32
# The long-tail shape (Amazon reviews): defaults per interaction, and how items are drawn.
LONG_TAIL_INTERACTIONS_PER_USER = 5  # mean; every user has at least _LONG_TAIL_MIN_PER_USER
LONG_TAIL_INTERACTIONS_PER_ITEM = 50  # mean over the catalog (the head has far more, most far fewer)
_LONG_TAIL_MIN_PER_USER = 2
_LONG_TAIL_CANDIDATES = 8  # popularity draws per interaction, one of which affinity picks
# Popularity ~ 1 / (rank + offset): the offset flattens the very head, so the top item holds ~1%
# of the interactions rather than the ~8% a pure 1 / rank gives over 200k items.
_LONG_TAIL_HEAD_OFFSET = 10.0
_LONG_TAIL_SPAN_SECONDS = 2 * 365 * 86_400  # users arrive over two years
_LONG_TAIL_MEAN_GAP_SECONDS = 7 * 86_400
_LONG_TAIL_CHUNK = 1 << 18  # interactions drawn at once: (chunk, candidates, dim) float32 is 128 MB
_LONG_TAIL_REDRAWS = 8  # rounds of redrawing repeated (user, item) pairs


def generate_synthetic(
    n_users: int = 2000, n_items: int = 5000, interactions_per_user: int = 30, dim: int = 16, seed: int = 0
) -> Dataset:
    """Sample a dataset from a latent-factor model; the same arguments give the same frames.

    Users and items get Gaussian vectors; items a Zipf popularity over a random order. Each user
    draws ``interactions_per_user`` distinct items from softmax(user.item + log popularity)
    (Gumbel top-k, chunked over users so 1M items fit), in random time order with increasing
    timestamps. Ratings 1..5 grow with user.item. Item ``category`` is the item's largest latent
    dimension ("c<d>"), so it predicts taste; ``price`` is lognormal. Ids are "u<n>" / "i<n>".
    """
    sizes = {"n_users": n_users, "n_items": n_items, "interactions_per_user": interactions_per_user, "dim": dim}
    for name, value in sizes.items():
        if value < 1:
            raise DataError(f"synthetic: {name} must be at least 1, got {value}")
    if interactions_per_user > n_items:
        raise DataError(f"synthetic: interactions_per_user ({interactions_per_user}) exceeds n_items ({n_items})")
    rng = np.random.default_rng(seed)
    k = interactions_per_user
    # Entry variance chosen so that user.item has standard deviation _AFFINITY_STD.
    entry_std = (_AFFINITY_STD**2 / dim) ** 0.25
    user_vectors = (rng.standard_normal((n_users, dim), dtype=np.float32) * entry_std).astype(np.float32)
    item_vectors = (rng.standard_normal((n_items, dim), dtype=np.float32) * entry_std).astype(np.float32)
    log_popularity = (-_ZIPF_EXPONENT * np.log1p(rng.permutation(n_items))).astype(np.float32)

    picks = np.empty((n_users, k), dtype=np.int64)
    affinity = np.empty((n_users, k), dtype=np.float32)
    items_by_dim = np.ascontiguousarray(item_vectors.T)  # (dim, n_items): scores land row-major
    chunk = min(n_users, max(1, _CHUNK_CELLS // n_items))
    # Reused buffers: a fresh 16 MB array per chunk adds ~20% in page faults alone.
    logits_buffer = np.empty((chunk, n_items), dtype=np.float32)
    noise_buffer = np.empty((chunk, n_items), dtype=np.float32)
    for start in range(0, n_users, chunk):
        users = user_vectors[start : start + chunk]
        logits, noise = logits_buffer[: len(users)], noise_buffer[: len(users)]
        np.matmul(users, items_by_dim, out=logits)
        logits += log_popularity
        # Adding Gumbel noise -log(-log(U)) and keeping the top k draws k items without
        # replacement from softmax(logits). Uniform + two logs is 2x faster than exponentials.
        rng.random(out=noise, dtype=np.float32)
        with np.errstate(divide="ignore"):  # U == 0 gives noise -inf: that item is never picked
            np.log(noise, out=noise)
            np.log(np.negative(noise, out=noise), out=noise)
        logits -= noise
        top = np.argpartition(logits, n_items - k, axis=1)[:, n_items - k :]
        top = rng.permuted(top, axis=1)  # time order independent of score order
        picks[start : start + chunk] = top
        affinity[start : start + chunk] = np.einsum("ud,ukd->uk", users, item_vectors[top])

    noise = rng.normal(0.0, _RATING_NOISE, size=affinity.shape)
    ratings = np.clip(np.rint(_RATING_CENTER + _RATING_SLOPE * affinity + noise), 1, 5).astype(np.float32)
    gaps = np.maximum(1, rng.exponential(_MEAN_GAP_SECONDS, size=(n_users, k))).astype(np.int64)
    first = _START + rng.integers(0, 365 * 86_400, size=(n_users, 1))
    timestamps = first + np.cumsum(gaps, axis=1)

    item_ids = _labels("i", n_items)
    raw = pd.DataFrame(
        {
            schema.USER_ID: np.repeat(_labels("u", n_users), k),
            schema.ITEM_ID: item_ids[picks.ravel()],
            schema.RATING: ratings.ravel(),
            schema.TIMESTAMP: timestamps.ravel(),
        },
        index=np.arange(1, n_users * k + 1),
    )
    return _dataset(raw, item_ids, item_vectors, rng)


def generate_long_tail(
    n_interactions: int,
    n_users: int | None = None,
    n_items: int | None = None,
    dim: int = 16,
    seed: int = 0,
) -> Dataset:
    """About ``n_interactions`` interactions in the Amazon-reviews shape; seeded, vectorised.

    ``n_users`` defaults to ``n_interactions / 5`` and ``n_items`` to ``n_interactions / 50``.
    Each user has 2 + a geometric-like number of interactions (a multinomial over exponential
    weights: mean 5, about 70% of users with 2 to 5, a few with dozens). Each interaction draws
    ``_LONG_TAIL_CANDIDATES`` items from a popularity ~ 1 / (rank + 10) over a random item order
    and keeps one by a Gumbel-max over their affinity ``user . item``, so taste matters as in
    :func:`generate_synthetic` at a cost linear in the interactions (no users x items matrix).
    A repeated (user, item) pair is redrawn; the rare pair still repeated after a few rounds is
    dropped by validation, so the count can fall short by a handful. Timestamps: each user starts
    at a uniform time over two years, then exponential gaps (mean a week). Ratings, categories,
    prices and ids as :func:`generate_synthetic`.
    """
    n_users = n_users or max(1, n_interactions // LONG_TAIL_INTERACTIONS_PER_USER)
    n_items = n_items or max(100, n_interactions // LONG_TAIL_INTERACTIONS_PER_ITEM)
    for name, value in {"n_interactions": n_interactions, "n_users": n_users, "n_items": n_items, "dim": dim}.items():
        if value < 1:
            raise DataError(f"synthetic: {name} must be at least 1, got {value}")
    if n_interactions < _LONG_TAIL_MIN_PER_USER * n_users:
        raise DataError(
            f"synthetic: {n_interactions} interactions cannot give {n_users} users {_LONG_TAIL_MIN_PER_USER} each"
        )
    if n_items < 2 * _LONG_TAIL_MIN_PER_USER:
        raise DataError(f"synthetic: n_items must be at least {2 * _LONG_TAIL_MIN_PER_USER}, got {n_items}")
    rng = np.random.default_rng(seed)
    entry_std = (_AFFINITY_STD**2 / dim) ** 0.25
    user_vectors = (rng.standard_normal((n_users, dim), dtype=np.float32) * entry_std).astype(np.float32)
    item_vectors = (rng.standard_normal((n_items, dim), dtype=np.float32) * entry_std).astype(np.float32)
    by_rank = rng.permutation(n_items)  # item at each popularity rank

    weights = rng.exponential(size=n_users)
    extra = rng.multinomial(n_interactions - _LONG_TAIL_MIN_PER_USER * n_users, weights / weights.sum())
    # A user cannot have more distinct items than half the catalog (redraws would never end).
    counts = np.minimum(_LONG_TAIL_MIN_PER_USER + extra, n_items // 2)
    owner = np.repeat(np.arange(n_users, dtype=np.int64), counts)

    picks = np.empty(len(owner), dtype=np.int64)
    todo = np.arange(len(owner))
    for _ in range(_LONG_TAIL_REDRAWS):
        for start in range(0, len(todo), _LONG_TAIL_CHUNK):
            rows = todo[start : start + _LONG_TAIL_CHUNK]
            picks[rows] = _draw_items(rng, user_vectors[owner[rows]], item_vectors, by_rank)
        todo = _repeated_pairs(owner, picks, n_items)
        if not len(todo):
            break

    affinity = np.empty(len(owner), dtype=np.float32)
    for start in range(0, len(owner), _LONG_TAIL_CHUNK):
        rows = slice(start, start + _LONG_TAIL_CHUNK)
        affinity[rows] = np.einsum("nd,nd->n", user_vectors[owner[rows]], item_vectors[picks[rows]])
    noise = rng.normal(0.0, _RATING_NOISE, size=len(owner)).astype(np.float32)
    ratings = np.clip(np.rint(_RATING_CENTER + _RATING_SLOPE * affinity + noise), 1, 5).astype(np.float32)
    gaps = np.maximum(1, rng.exponential(_LONG_TAIL_MEAN_GAP_SECONDS, size=len(owner))).astype(np.int64)
    elapsed = np.cumsum(gaps)
    starts = np.cumsum(counts) - counts  # each user's first row
    elapsed -= np.repeat(elapsed[starts] - gaps[starts], counts)  # restart the running sum per user
    first = _START + rng.integers(0, _LONG_TAIL_SPAN_SECONDS, size=n_users)
    timestamps = first[owner] + elapsed

    item_ids = _labels("i", n_items)
    raw = pd.DataFrame(
        {
            # As codes over the labels: 10M rows never become 10M strings.
            schema.USER_ID: pd.Categorical.from_codes(owner, categories=pd.Index(_labels("u", n_users), dtype="str")),
            schema.ITEM_ID: pd.Categorical.from_codes(picks, categories=pd.Index(item_ids, dtype="str")),
            schema.RATING: ratings,
            schema.TIMESTAMP: timestamps,
        },
        index=np.arange(1, len(owner) + 1),
    )
    return _dataset(raw, item_ids, item_vectors, rng)


def _dataset(raw: pd.DataFrame, item_ids: np.ndarray, item_vectors: np.ndarray, rng: np.random.Generator) -> Dataset:
    """The interactions and an item table (category: each item's strongest taste dimension; a price)."""
    items = pd.DataFrame(
        {
            schema.ITEM_ID: pd.Series(item_ids, dtype="str"),
            schema.CATEGORY: pd.Series(_labels("c", item_vectors.shape[1])[item_vectors.argmax(axis=1)], dtype="str"),
            schema.PRICE: np.round(rng.lognormal(3.0, 0.8, size=len(item_ids)), 2),
        }
    )
    return Dataset(
        name="synthetic",
        interactions=validate_interactions(raw, "synthetic"),
        items=items,
        item_id_field=schema.ITEM_ID,
        rating_scale=(1.0, 5.0),
    )


def _draw_items(
    rng: np.random.Generator, users: np.ndarray, item_vectors: np.ndarray, by_rank: np.ndarray
) -> np.ndarray:
    """One item per row of ``users``: the Gumbel-max over the affinity of a few popularity draws."""
    n_items = len(by_rank)
    # Inverse CDF of the continuous 1 / (rank + offset) law: O(1) a draw, no search over the catalog.
    offset = _LONG_TAIL_HEAD_OFFSET
    uniform = rng.random((len(users), _LONG_TAIL_CANDIDATES))
    rank = offset * np.expm1(uniform * np.log1p(n_items / offset))
    candidates = by_rank[np.minimum(rank.astype(np.int64), n_items - 1)]
    logits = np.einsum("nd,ncd->nc", users, item_vectors[candidates])
    logits -= np.log(-np.log(rng.random(logits.shape, dtype=np.float32) + np.float32(1e-12)))
    return candidates[np.arange(len(users)), logits.argmax(axis=1)]


def _repeated_pairs(owner: np.ndarray, picks: np.ndarray, n_items: int) -> np.ndarray:
    """Rows whose (user, item) pair already occurred in an earlier row."""
    key = owner * n_items + picks
    order = np.argsort(key, kind="stable")
    repeated = np.zeros(len(key), dtype=bool)
    repeated[1:] = key[order[1:]] == key[order[:-1]]
    return np.sort(order[repeated])


def _labels(prefix: str, n: int) -> np.ndarray:
    return np.char.add(prefix, np.arange(n).astype(str))
