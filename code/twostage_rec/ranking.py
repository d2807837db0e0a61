"""Stage 2: one feature matrix for all candidates, one XGBoost call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import xgboost as xgb

from twostage_rec import schema
from twostage_rec.artifact import ModelArtifact

class Ranker(Protocol):
    """Scores candidate rows (a higher score ranks first) and predicts their ratings."""

    def score(self, mf_score: np.ndarray, user_rows: np.ndarray, item_rows: np.ndarray) -> RankedRows: ...


@dataclass(frozen=True)
class RankedRows:
    score: np.ndarray  # float32, the ordering key
    predicted_rating: np.ndarray  # float32, clipped to the rating scale


class FeatureLayout:
    """Where each ranker feature comes from, resolved once from the manifest's feature order."""

    def __init__(self, ranker_features: list[str], user_features: list[str], item_features: list[str]) -> None:
        self.names = list(ranker_features)
        self._mf = [c for c, n in enumerate(self.names) if n == schema.MF_SCORE]
        self._user = [(c, user_features.index(n)) for c, n in enumerate(self.names) if n in user_features]
        self._item = [(c, item_features.index(n)) for c, n in enumerate(self.names) if n in item_features]

    def matrix(self, mf_score: np.ndarray, user_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        """``user_rows`` has one row per candidate (or one row broadcast to all)."""
        x = np.empty((len(item_rows), len(self.names)), dtype=np.float32)
        for c in self._mf:
            x[:, c] = mf_score
        for c, u in self._user:
            x[:, c] = user_rows[:, u] if user_rows.ndim == 2 else user_rows[u]
        for c, i in self._item:
            x[:, c] = item_rows[:, i]
        return x


class XGBoostRanker:
    """The artifact's ``ranker.ubj`` (order) and ``rating_model.ubj`` (predicted rating)."""

    def __init__(self, artifact: ModelArtifact) -> None:
        m = artifact.manifest
        self.booster = _load_booster(str(artifact.ranker_path))
        self.rating_booster = _load_booster(str(artifact.rating_model_path))
        self.layout = FeatureLayout(m.ranker_features, m.user_feature_names, m.item_feature_names)
        self.objective = m.ranker_objective
        self._rating_range = (float(m.rating_min), float(m.rating_max))

    def score(self, mf_score: np.ndarray, user_rows: np.ndarray, item_rows: np.ndarray) -> RankedRows:
        if not len(item_rows):
            empty = np.empty(0, dtype=np.float32)
            return RankedRows(empty, empty)
        x = self.layout.matrix(mf_score, user_rows, item_rows)
        score = self.booster.inplace_predict(x, validate_features=False)
        rating = self.rating_booster.inplace_predict(x, validate_features=False)
        return RankedRows(
            np.asarray(score, dtype=np.float32),
            np.clip(np.asarray(rating, dtype=np.float32), *self._rating_range),
        )


def _load_booster(path: str) -> xgb.Booster:
    booster = xgb.Booster()
    booster.load_model(path)
    # One thread per prediction: the model server already runs one worker per vCPU, and
    # OpenMP threads on top of that only fight over the same cores for 100-row matrices.
    booster.set_param({"nthread": 1})
    return booster
