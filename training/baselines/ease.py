"""EASE (Steck 2019): a closed-form item-item linear model over the whole profile.

``B = I - P / diag(P)`` with ``P = (X^T X + lambda I)^-1`` (each column of ``P`` divided by its
diagonal entry, so the diagonal of ``B`` is zero); a user's scores are ``x_u B``. A baseline
only: it reads the history as a set.

Only ``P`` is kept, never ``B``: ``x_u B = x_u - (x_u P) / diag(P)``. ``P`` is dense in the items,
float32 and inverted in place (one Cholesky factorisation, ``n_items^3`` flops, then the inverse
from the factor), so a fit holds one ``n_items x n_items`` float32 matrix (1.6 GB at 20k items)
besides the sparse Gram matrix. Where that does not fit the report's budget the pipeline skips
EASE (:func:`training.report_budget.plan_ease`).

float32 against the float64 ``np.linalg.inv`` of ``B`` it replaces, on the media-shaped 1M data
(the 10,000 most popular items, lambda 100 and 1000): ``B`` differs by at most 4e-6 of its
largest entry, validation NDCG@10 is equal to six digits, every user's top 100 is the same set
and 99.7% of the rankings are identical in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack

from training.interactions import Histories

DEFAULT_LAMBDAS = (100.0, 300.0, 1000.0, 3000.0)
# Rows of P made symmetric at a time: the copied block is n_items x this float32 (80 MB at 20k).
_SYMMETRIZE_ROWS = 1024


class EaseError(ValueError):
    """The Gram matrix plus lambda is not positive definite (lambda <= 0)."""


def user_item_matrix(histories: Histories, n_items: int) -> sp.csr_matrix:
    """Binary (n_users, n_items) float32 matrix of who interacted with what."""
    users = np.repeat(np.arange(histories.n_users), histories.lengths)
    matrix = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, histories.items)), shape=(histories.n_users, n_items)
    )
    matrix.data[:] = 1.0  # a repeated interaction is still one
    return matrix


@dataclass(frozen=True)
class ItemGram:
    """``X^T X`` over ``items`` (every item when None) of an ``n_items`` catalog, sparse float32.

    Every fit of a lambda grid starts from this one. Its entries are co-occurrence counts, exact
    in float32 up to 2^24 users.
    """

    matrix: sp.csr_matrix
    n_items: int
    items: np.ndarray | None = None


def item_gram(histories: Histories, n_items: int, items: np.ndarray | None = None) -> ItemGram:
    """The Gram matrix of the catalog, or of its ``items`` only (a smaller model: see :class:`EaseModel`)."""
    x = user_item_matrix(histories, n_items)
    if items is not None:
        x = x[:, items]
    return ItemGram((x.T @ x).tocsr(), n_items, items)


@dataclass(frozen=True)
class EaseModel:
    """``P = (X^T X + lambda I)^-1`` (float32, symmetric) and its diagonal: ``B`` without storing it.

    A model of some ``items`` only scores those; every other item scores -inf (never ranked).
    """

    p: np.ndarray
    diagonal: np.ndarray
    n_items: int
    items: np.ndarray | None = None

    def weights(self) -> np.ndarray:
        """The dense ``B`` over the model's items (a new array; for tests and small catalogs)."""
        return np.eye(len(self.diagonal), dtype=np.float32) - self.p / self.diagonal

    def scorer(self, histories: Histories) -> Callable[[np.ndarray], np.ndarray]:
        """``scores(user_idx)``: each user's profile (from ``histories``) times ``B``, float32
        (n_queries, n_items)."""
        x = user_item_matrix(histories, self.n_items)
        if self.items is not None:
            x = x[:, self.items]
        inverse_diagonal = (1.0 / self.diagonal).astype(np.float32)

        def scores(users: np.ndarray) -> np.ndarray:
            profile = x[users]
            out = np.asarray(profile @ self.p)
            out *= -inverse_diagonal
            rows, cols = profile.nonzero()
            out[rows, cols] += 1.0  # the identity's part of B
            if self.items is None:
                return out
            full = np.full((len(users), self.n_items), -np.inf, dtype=np.float32)
            full[:, self.items] = out
            return full

        return scores


def fit_ease(gram: ItemGram, lam: float) -> EaseModel:
    """EASE with regulariser ``lam`` from the Gram matrix ``X^T X`` (:func:`item_gram`)."""
    n = gram.matrix.shape[0]
    if n == 0:
        return EaseModel(np.zeros((0, 0), np.float32), np.zeros(0, np.float32), gram.n_items, gram.items)
    dense = gram.matrix.toarray().astype(np.float32, copy=False)
    dense[np.diag_indices(n)] += np.float32(lam)
    # LAPACK works on column-major arrays: the transpose of the C-ordered symmetric matrix is the
    # same matrix in column-major order, so both calls work in place (no second n x n copy).
    # Its upper triangle (column-major) is the lower one of ``dense``.
    factor, info = lapack.spotrf(dense.T, lower=False, overwrite_a=True, clean=False)
    if info != 0:
        raise EaseError(f"EASE: X^T X + {lam:g} I is not positive definite (LAPACK spotrf info {info})")
    inverse, info = lapack.spotri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise EaseError(f"EASE: the inverse failed (LAPACK spotri info {info})")
    p = inverse.T  # ``dense`` itself, C-ordered, with its lower triangle valid
    _mirror_lower(p)
    return EaseModel(p, p.diagonal().copy(), gram.n_items, gram.items)


def _mirror_lower(a: np.ndarray) -> None:
    """Copy the lower triangle of square ``a`` onto its upper one, in place, a block of rows at a time."""
    n = len(a)
    for start in range(0, n, _SYMMETRIZE_ROWS):
        end = min(n, start + _SYMMETRIZE_ROWS)
        a[start:end, end:] = a[end:, start:end].T
        block = a[start:end, start:end]
        upper = np.triu_indices(end - start, 1)
        block[upper] = block.T[upper]
