"""The original design's rating model as a baseline: Surprise's SVD (Funk MF with biases).

Fit with ``scikit-surprise`` on explicit ratings, then every item is scored by the learned
``mu + b_u + b_i + p_u . q_i`` in numpy (Surprise's own ``predict`` is one Python call per pair,
far too slow for full ranking). Training extras only: never in the serving image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.interactions import Encoded


@dataclass(frozen=True)
class SvdConfig:
    n_factors: int = 100
    n_epochs: int = 20
    lr_all: float = 0.005
    reg_all: float = 0.02
    seed: int = 0


# A small grid around Surprise's defaults; validation NDCG@10 picks one.
DEFAULT_GRID = (SvdConfig(), SvdConfig(n_factors=50, reg_all=0.05))


@dataclass(frozen=True)
class SvdModel:
    """The learned parameters, indexed by our user_idx / item_idx (zeros for unseen ones)."""

    mean: float
    user_bias: np.ndarray
    item_bias: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray

    def scorer(self) -> Callable[[np.ndarray], np.ndarray]:
        return lambda users: (
            self.mean
            + self.user_bias[users, None]
            + self.item_bias[None, :]
            + self.user_factors[users] @ self.item_factors.T
        )


def fit_svd(
    data: Encoded, n_users: int, n_items: int, rating_scale: tuple[float, float], config: SvdConfig
) -> SvdModel:
    from surprise import SVD, Dataset, Reader

    frame = pd.DataFrame({"u": data.user_idx, "i": data.item_idx, "r": data.rating.astype(np.float64)})
    trainset = Dataset.load_from_df(frame, Reader(rating_scale=rating_scale)).build_full_trainset()
    algo = SVD(
        n_factors=config.n_factors,
        n_epochs=config.n_epochs,
        lr_all=config.lr_all,
        reg_all=config.reg_all,
        random_state=config.seed,
    )
    algo.fit(trainset)
    users = np.array([trainset.to_raw_uid(inner) for inner in range(trainset.n_users)], dtype=np.int64)
    items = np.array([trainset.to_raw_iid(inner) for inner in range(trainset.n_items)], dtype=np.int64)
    user_bias, item_bias = np.zeros(n_users, np.float32), np.zeros(n_items, np.float32)
    user_factors = np.zeros((n_users, config.n_factors), np.float32)
    item_factors = np.zeros((n_items, config.n_factors), np.float32)
    user_bias[users], item_bias[items] = algo.bu, algo.bi
    user_factors[users], item_factors[items] = algo.pu, algo.qi
    return SvdModel(float(trainset.global_mean), user_bias, item_bias, user_factors, item_factors)
