"""Stage 2: one XGBoost call orders every candidate of a request; a second predicts its rating."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import xgboost as xgb

from twostage_rec.artifact import ModelArtifact


class Ranker(Protocol):
    """Scores candidate rows (a higher score ranks first) and predicts their ratings."""

    def score(self, x: np.ndarray) -> np.ndarray:
        """float32 order key of each row of the ranker matrix
        (:class:`~twostage_rec.candidate_features.CandidateFeatureBuilder`)."""
        ...

    def predicted_rating(self, x: np.ndarray) -> np.ndarray:
        """float32 rating of each row, clipped to the rating scale (only the rows shown need one)."""
        ...


class XGBoostRanker:
    """The artifact's ``ranker.ubj`` (order) and ``rating_model.ubj`` (predicted rating)."""

    def __init__(self, artifact: ModelArtifact) -> None:
        m = artifact.manifest
        self.booster = _load_booster(str(artifact.ranker_path))
        self.rating_booster = _load_booster(str(artifact.rating_model_path))
        self.objective = m.ranker_objective
        self._rating_range = (float(m.rating_min), float(m.rating_max))

    def score(self, x: np.ndarray) -> np.ndarray:
        if not len(x):
            return np.empty(0, dtype=np.float32)
        return np.asarray(self.booster.inplace_predict(x, validate_features=False), dtype=np.float32)

    def predicted_rating(self, x: np.ndarray) -> np.ndarray:
        if not len(x):
            return np.empty(0, dtype=np.float32)
        rating = self.rating_booster.inplace_predict(x, validate_features=False)
        return np.clip(np.asarray(rating, dtype=np.float32), *self._rating_range)


def _load_booster(path: str) -> xgb.Booster:
    booster = xgb.Booster()
    booster.load_model(path)
    # One thread per prediction: the model server already runs one worker per vCPU, and
    # OpenMP threads on top of that only fight over the same cores for 100-row matrices.
    booster.set_param({"nthread": 1})
    return booster
