"""A seeded latent-factor world: data with known structure, any size, no download."""

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
    items = pd.DataFrame(
        {
            schema.ITEM_ID: pd.Series(item_ids, dtype="str"),
            schema.CATEGORY: pd.Series(_labels("c", dim)[item_vectors.argmax(axis=1)], dtype="str"),
            schema.PRICE: np.round(rng.lognormal(3.0, 0.8, size=n_items), 2),
        }
    )
    return Dataset(
        name="synthetic",
        interactions=validate_interactions(raw, "synthetic"),
        items=items,
        item_id_field=schema.ITEM_ID,
        rating_scale=(1.0, 5.0),
    )


def _labels(prefix: str, n: int) -> np.ndarray:
    return np.char.add(prefix, np.arange(n).astype(str))
