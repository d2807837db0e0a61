"""Serving configuration: one frozen object built from the environment at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

FeatureSourceKind = Literal["embedded", "featurestore", "cached"]
UnknownUserPolicy = Literal["popular", "error"]
_N = TypeVar("_N", int, float)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# CloudWatch's namespace rule: 1-255 of these characters, at least one not a space; AWS/ is reserved.
_NAMESPACE = re.compile(r"[0-9A-Za-z._\-/#: ]{1,255}")
DEFAULT_MAX_REQUEST_BYTES = 6 * 1024 * 1024  # SageMaker's default MaxPayloadInMB and real-time limit


class SettingsError(ValueError):
    """An environment variable has a value we cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    """Everything the serving path reads from the environment, validated once."""

    feature_source: FeatureSourceKind = "embedded"
    feature_group_name: str | None = None
    region: str | None = None
    feature_store_endpoint_url: str | None = None
    feature_store_deadline_ms: float = 200.0
    feature_store_connect_timeout_s: float = 0.5
    feature_store_max_attempts: int = 2
    feature_store_parallelism: int = 4
    feature_store_strict: bool = False
    # Each Feature Store group gets a circuit breaker (per worker): this many consecutive failed
    # or timed-out calls open it; it lets one probe through after breaker_open_s.
    breaker_failures: int = 5
    breaker_open_s: float = 5.0
    # Users' recent histories in their own group; None: the artifact's and the request's only.
    user_history_feature_group_name: str | None = None
    cache_ttl_s: float = 300.0
    cache_max_items: int = 200_000
    unknown_user: UnknownUserPolicy = "popular"
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_batch_size: int = 100
    # Threads that answer a JSON Lines body's batches of max_batch_size users side by side (a Batch
    # Transform mini-batch holds thousands of lines; XGBoost, ONNX Runtime and numpy's top-n release
    # the GIL while they work). The environment's default is one per available CPU.
    batch_threads: int = 1
    # Approximate retrieval (IVF index): used from this catalog size on, when the index's
    # recall@100 measured at packaging reaches ann_min_recall; ann_n_probe 0 = the packaged value.
    ann_min_items: int = 200_000
    ann_min_recall: float = 0.95
    ann_n_probe: int = 0
    # Free heap each worker keeps for request temporaries instead of page-faulting them in again
    # every request (twostage_rec.allocator); 0 leaves glibc's defaults.
    malloc_keep_mb: int = 256
    # Per-stage CloudWatch metrics as EMF records on each worker's stdout (twostage_rec.request_metrics),
    # aggregated over at most metrics_window_s seconds.
    metrics_enabled: bool = True
    metrics_namespace: str = "TwoStageRec"
    metrics_window_s: float = 10.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        group = env.get("FEATURE_GROUP_NAME") or None
        default_source: FeatureSourceKind = "cached" if group else "embedded"
        source = env.get("FEATURE_SOURCE", default_source)
        if source not in ("embedded", "featurestore", "cached"):
            raise SettingsError(f"FEATURE_SOURCE={source!r}: expected embedded, featurestore or cached")
        if source != "embedded" and not group:
            raise SettingsError(f"FEATURE_SOURCE={source} needs FEATURE_GROUP_NAME")
        unknown = env.get("UNKNOWN_USER_POLICY", "popular")
        if unknown not in ("popular", "error"):
            raise SettingsError(f"UNKNOWN_USER_POLICY={unknown!r}: expected popular or error")
        # A Batch Transform job tells its container its MaxPayloadInMB (AWS's inference toolkit
        # reads the same variable): mini-batches that large must pass, whoever created the job.
        payload_mb = env_integer(env, "SAGEMAKER_MAX_PAYLOAD_IN_MB", 0, 0, 100)
        request_limit = max(DEFAULT_MAX_REQUEST_BYTES, payload_mb << 20)
        return cls(
            feature_source=source,  # type: ignore[arg-type]
            feature_group_name=group,
            # botocore ignores AWS_REGION; read both names and pass the region explicitly.
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            feature_store_endpoint_url=env.get("FEATURE_STORE_ENDPOINT_URL") or None,
            feature_store_deadline_ms=_number(env, "FEATURE_STORE_DEADLINE_MS", 200.0, 1.0, 60_000.0),
            feature_store_connect_timeout_s=_number(env, "FEATURE_STORE_CONNECT_TIMEOUT_S", 0.5, 0.01, 60.0),
            feature_store_max_attempts=env_integer(env, "FEATURE_STORE_MAX_ATTEMPTS", 2, 1, 10),
            feature_store_parallelism=env_integer(env, "FEATURE_STORE_PARALLELISM", 4, 1, 64),
            feature_store_strict=_flag(env, "FEATURE_STORE_STRICT", False),
            breaker_failures=env_integer(env, "FEATURE_STORE_BREAKER_FAILURES", 5, 1, 1000),
            breaker_open_s=_number(env, "FEATURE_STORE_BREAKER_OPEN_S", 5.0, 0.0, 3600.0),
            # Independent of the item source: history can come from Feature Store while item
            # features come from the embedded snapshot, and the other way round.
            user_history_feature_group_name=env.get("USER_HISTORY_FEATURE_GROUP_NAME") or None,
            cache_ttl_s=_number(env, "FEATURE_CACHE_TTL_S", 300.0, 0.0, 86_400.0),
            cache_max_items=env_integer(env, "FEATURE_CACHE_MAX_ITEMS", 200_000, 0, 100_000_000),
            unknown_user=unknown,  # type: ignore[arg-type]
            max_request_bytes=env_integer(env, "MAX_REQUEST_BYTES", request_limit, 1024, 100 * 1024 * 1024),
            max_batch_size=env_integer(env, "MAX_BATCH_SIZE", 100, 1, 1000),
            batch_threads=env_integer(env, "BATCH_THREADS", available_cpus(), 1, 64),
            ann_min_items=env_integer(env, "ANN_MIN_ITEMS", 200_000, 0, 10**12),
            ann_min_recall=_number(env, "ANN_MIN_RECALL", 0.95, 0.0, 1.0),
            ann_n_probe=env_integer(env, "ANN_N_PROBE", 0, 0, 10**9),
            malloc_keep_mb=env_integer(env, "MALLOC_KEEP_MB", 256, 0, 2047),  # mallopt takes an int
            metrics_enabled=_flag(env, "METRICS_ENABLED", True),
            metrics_namespace=_namespace(env, "METRICS_NAMESPACE", "TwoStageRec"),
            # A window's values reach CloudWatch when it closes, stamped with its start: at most 10 s late.
            metrics_window_s=_number(env, "METRICS_WINDOW_S", 10.0, 0.1, 10.0),
        )


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    return _bounded(env, name, float(default), low, high, float, "a number")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a container's cpuset limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def env_integer(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """An integer environment variable in [low, high]; :class:`SettingsError` names it otherwise."""
    return _bounded(env, name, default, low, high, int, "an integer")


def _bounded(
    env: Mapping[str, str], name: str, default: _N, low: float, high: float, parse: Callable[[str], _N], kind: str
) -> _N:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: not {kind}") from None
    if not low <= value <= high:
        bounds = f"{low:g} and {high:g}" if parse is float else f"{low} and {high}"
        raise SettingsError(f"{name}={raw!r}: must be between {bounds}")
    return value


def _namespace(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not _NAMESPACE.fullmatch(raw) or not raw.strip() or raw.startswith("AWS/"):
        raise SettingsError(f"{name}={raw!r}: a CloudWatch namespace is 1-255 letters, digits or . - _ / # : "
                            "and spaces, not starting with AWS/")
    return raw


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r}: expected true or false")
