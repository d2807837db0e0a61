"""Fault injection for the runtime API: throttling, 5xx, added latency and partial batch results.

Faults are drawn from one seeded generator, so a fixed seed and a fixed sequence of requests give
the same faults every run. Only the runtime operations see faults; the control plane and the
admin routes never do.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

from local_test.feature_store.store import ApiError

RATE_FIELDS: Final = ("throttle_rate", "error_rate", "unprocessed_rate", "record_error_rate")


@dataclass(frozen=True)
class FaultConfig:
    """What to inject; rates are per request (throttle, error) or per record id (the others)."""

    throttle_rate: float = 0.0  # 400 ThrottlingException, which botocore retries
    error_rate: float = 0.0  # half 500 InternalFailure, half 503 ServiceUnavailable
    latency_ms: float = 0.0  # added before every runtime request
    unprocessed_rate: float = 0.0  # BatchGetRecord ids moved to UnprocessedIdentifiers
    record_error_rate: float = 0.0  # BatchGetRecord ids answered as Errors entries
    seed: int | None = None  # None: a fresh random seed

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FaultConfig:
        """Validate settings from JSON or the command line; raise ValueError naming the bad one."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown fault setting(s) {unknown}; known settings are {known}")
        for name in RATE_FIELDS:
            value = values.get(name, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"fault setting {name} must be a number from 0 to 1, got {value!r}")
        latency = values.get("latency_ms", 0.0)
        if isinstance(latency, bool) or not isinstance(latency, (int, float)) or latency < 0:
            raise ValueError(f"fault setting latency_ms must be a number >= 0, got {latency!r}")
        seed = values.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"fault setting seed must be an integer, got {seed!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values."""
        return asdict(self)


class FaultInjector:
    """Draws faults for requests; reconfigurable while the server runs (thread-safe)."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self._lock = threading.Lock()
        self.configure(config or FaultConfig())

    def configure(self, config: FaultConfig) -> None:
        """Replace every setting and reseed the generator."""
        with self._lock:
            self._config = config
            self._rng = random.Random(config.seed)

    @property
    def config(self) -> FaultConfig:
        """The current settings."""
        with self._lock:
            return self._config

    def _draw(self, rate: float) -> bool:
        # Called with the lock held; a zero rate consumes no randomness.
        return rate > 0.0 and self._rng.random() < rate

    def before_request(self) -> None:
        """Sleep the configured latency, then maybe raise a throttling or 5xx ApiError."""
        with self._lock:
            config = self._config
            throttle = self._draw(config.throttle_rate)
            error = self._draw(config.error_rate)
            unavailable = error and self._rng.random() < 0.5
        if config.latency_ms > 0:
            time.sleep(config.latency_ms / 1000.0)
        if throttle:
            raise ApiError("ThrottlingException", "Rate exceeded (injected fault)", 400)
        if unavailable:
            raise ApiError("ServiceUnavailable", "Service unavailable (injected fault)", 503)
        if error:
            raise ApiError("InternalFailure", "Internal failure (injected fault)", 500)

    def split_batch(self, record_ids: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
        """Split BatchGetRecord ids into (served, unprocessed, errored)."""
        served: list[str] = []
        unprocessed: list[str] = []
        errored: list[str] = []
        with self._lock:
            for record_id in record_ids:
                if self._draw(self._config.unprocessed_rate):
                    unprocessed.append(record_id)
                elif self._draw(self._config.record_error_rate):
                    errored.append(record_id)
                else:
                    served.append(record_id)
        return served, unprocessed, errored
