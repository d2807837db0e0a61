"""Stage 2: one XGBoost call orders every candidate of a request; a second predicts its rating."""

from __future__ import annotations

import ctypes
import json
import math
import threading
from typing import Any, Protocol

import numpy as np
import xgboost as xgb
from xgboost import core as xgb_core

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
        self._score = DensePredictor(self.booster)
        self._rating = DensePredictor(self.rating_booster)
        self.objective = m.ranker_objective
        self._rating_range = (float(m.rating_min), float(m.rating_max))

    def score(self, x: np.ndarray) -> np.ndarray:
        if not len(x):
            return np.empty(0, dtype=np.float32)
        return self._score(x)

    def predicted_rating(self, x: np.ndarray) -> np.ndarray:
        if not len(x):
            return np.empty(0, dtype=np.float32)
        return np.clip(self._rating(x), *self._rating_range)


class DensePredictor:
    """``booster.inplace_predict(x)`` of float32 rows, through the C function that method calls
    (``XGBoosterPredictFromDense``) without the Python around it.

    ``inplace_predict`` spends ~0.2 ms a call in Python (imports, type checks, two JSON documents,
    an array-interface class defined per call) around ~0.15-0.5 ms in C (xgboost 3.2.0, 10-100
    rows): a request makes two calls. Here the arguments' JSON is built once and the array's
    interface per call. The outputs are the same (a test checks); where this xgboost does not
    expose the function, every call goes through ``inplace_predict``.

    Each thread also passes its own proxy DMatrix, created once: without one, the C function
    constructs a proxy per call, and the proxy's context reads the cgroup CPU quota from /sys
    every time: ~30% of a call for 1-10 rows (a native profile), ~0.06 ms. Per thread, because
    a call sets the proxy's data: two threads sharing one would overwrite each other's.
    """

    def __init__(self, booster: xgb.Booster) -> None:
        self._booster = booster
        lib = getattr(xgb_core, "_LIB", None)
        self._predict = getattr(lib, "XGBoosterPredictFromDense", None)
        self._last_error = getattr(lib, "XGBGetLastError", None)
        self._new_proxy = getattr(lib, "XGProxyDMatrixCreate", None)
        self._free = getattr(lib, "XGDMatrixFree", None)
        self._local = threading.local()
        # The same arguments inplace_predict sends for its defaults (NaN is missing).
        self._arguments = json.dumps(
            {
                "type": 0,
                "training": False,
                "iteration_begin": 0,
                "iteration_end": 0,
                "missing": math.nan,
                "strict_shape": False,
                "cache_id": 0,
            }
        ).encode()

    @property
    def direct(self) -> bool:
        """True when calls skip ``inplace_predict``."""
        return self._predict is not None and self._last_error is not None

    def _proxy(self) -> ctypes.c_void_p:
        """This thread's proxy DMatrix handle (NULL where this xgboost cannot make one: the C
        function then makes its own per call)."""
        proxy = getattr(self._local, "proxy", None)
        if proxy is None:
            proxy = self._local.proxy = _Proxy(self._new_proxy, self._free)
        return proxy.handle

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 (len(x),): one prediction per row of the 2-D ``x``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not self.direct or x.ndim != 2:
            return np.asarray(self._booster.inplace_predict(x, validate_features=False), dtype=np.float32).ravel()
        interface = json.dumps(
            {"data": [x.ctypes.data, True], "shape": list(x.shape), "strides": None, "typestr": "<f4", "version": 3}
        ).encode()
        shape = ctypes.POINTER(ctypes.c_uint64)()
        dims = ctypes.c_uint64()
        out = ctypes.POINTER(ctypes.c_float)()
        status = self._predict(
            self._booster.handle,
            ctypes.c_char_p(interface),
            ctypes.c_char_p(self._arguments),
            self._proxy(),  # holds no meta info (no base margin): only the rows
            ctypes.byref(shape),
            ctypes.byref(dims),
            ctypes.byref(out),
        )
        if status != 0:
            raise xgb.core.XGBoostError(ctypes.c_char_p(self._last_error()).value.decode())  # type: ignore[union-attr]
        n = math.prod(shape[d] for d in range(dims.value))
        # The C buffer belongs to the booster and is reused by its next prediction: copied.
        return np.ctypeslib.as_array(out, (n,)).copy()


class _Proxy:
    """A proxy DMatrix handle, freed with this object (a thread's, when the thread ends)."""

    def __init__(self, create: Any, free: Any) -> None:
        self.handle = ctypes.c_void_p()
        self._free = free
        if create is not None and free is not None and create(ctypes.byref(self.handle)) != 0:
            self.handle = ctypes.c_void_p()

    def __del__(self) -> None:
        if self.handle.value is not None and self._free is not None:
            self._free(self.handle)
            self.handle = ctypes.c_void_p()


def _load_booster(path: str) -> xgb.Booster:
    booster = xgb.Booster()
    booster.load_model(path)
    # One thread per prediction: the model server already runs one worker per vCPU, and
    # OpenMP threads on top of that only fight over the same cores for 100-row matrices.
    booster.set_param({"nthread": 1})
    return booster
