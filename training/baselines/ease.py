"""EASE (Steck 2019): a closed-form item-item linear model over the whole profile.

``B = I - P / diag(P)`` with ``P = (X^T X + lambda I)^-1`` and the diagonal of ``B`` zero; a user's
scores are ``x_u B``. Dense in the items (an n_items x n_items inverse), so it only runs where
that fits in memory: :data:`MAX_ITEMS`. A baseline only: it reads the history as a set.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from training.interactions import Histories

# The Gram matrix and its inverse are n_items^2 float64 each: 20k items is 6.4 GB of the 24 GB here.
MAX_ITEMS = 20_000
DEFAULT_LAMBDAS = (100.0, 300.0, 1000.0, 3000.0)


def user_item_matrix(histories: Histories, n_items: int) -> sp.csr_matrix:
    """Binary (n_users, n_items) matrix of who interacted with what."""
    users = np.repeat(np.arange(histories.n_users), histories.lengths)
    matrix = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, histories.items)), shape=(histories.n_users, n_items)
    )
    matrix.data[:] = 1.0  # a repeated interaction is still one
    return matrix


def fit_ease(histories: Histories, n_items: int, lam: float) -> np.ndarray:
    """The item-item weights ``B`` (float32 n_items x n_items)."""
    if n_items > MAX_ITEMS:
        raise ValueError(f"EASE needs a dense {n_items}x{n_items} inverse; only catalogs up to {MAX_ITEMS} items")
    x = user_item_matrix(histories, n_items)
    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices(n_items)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32)


def ease_scorer(weights: np.ndarray, histories: Histories, n_items: int) -> Callable[[np.ndarray], np.ndarray]:
    """``scores(user_idx)``: each user's profile (from ``histories``) times ``weights``."""
    x = user_item_matrix(histories, n_items)
    return lambda users: np.asarray(x[users] @ weights)
