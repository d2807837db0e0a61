"""Item features for the ranker: one interface, three sources.

- :class:`EmbeddedFeatureSource`: the snapshot shipped in the artifact (default, no AWS).
- :class:`FeatureStoreSource`: SageMaker Feature Store online store via boto3 ``batch_get_record``.
- :class:`CachedFeatureSource`: a TTL- and size-bounded cache in front of another source.

Every source returns a float32 matrix with the artifact's ``item_feature_names`` as columns, one
row per requested item, NaN where a value is missing (XGBoost treats NaN as missing). The
recommender then sets the time-dependent columns at the request's ``as_of``
(:class:`~twostage_rec.timelines.PointInTimeFeatures`): a source supplies what does not change with time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np

from twostage_rec import schema
from twostage_rec.artifact import ModelArtifact
from twostage_rec.circuit_breaker import CircuitBreaker
from twostage_rec.errors import FeatureSourceUnavailable
from twostage_rec.settings import Settings

logger = logging.getLogger(__name__)

BATCH_GET_LIMIT: Final = 100  # BatchGetRecord accepts at most 100 record ids per call
BREAKER_OPEN: Final = "circuit breaker open"  # the problem reported while no call is made


def feature_store_name(feature: str) -> str:
    """The Feature Store column behind a ranker item feature (the category travels as its label)."""
    return schema.CATEGORY if feature == schema.CATEGORY_CODE else feature


@dataclass(frozen=True)
class FeatureBatch:
    values: np.ndarray  # float32 (n, n_item_features)
    degraded: bool = False  # some rows came from the snapshot because the primary source failed


class FeatureSource(Protocol):
    """Anything that turns item indices into the ranker's item-feature rows."""

    def get(self, item_idx: np.ndarray, deadline: float) -> FeatureBatch:
        """``deadline`` is a ``time.monotonic()`` value after which the source must give up."""
        ...


class EmbeddedFeatureSource:
    """Rows of the artifact's item-feature snapshot."""

    def __init__(self, artifact: ModelArtifact) -> None:
        self._matrix = artifact.item_features

    def get(self, item_idx: np.ndarray, deadline: float) -> FeatureBatch:
        return FeatureBatch(np.asarray(self._matrix[item_idx], dtype=np.float32))


class FeatureStoreSource:
    """SageMaker Feature Store online reads, in parallel chunks of 100, within a deadline.

    A circuit breaker stands in front of the store: while it is open, no call is made and the
    snapshot answers at once (``degraded``), instead of every request waiting for a dead store.
    """

    def __init__(
        self,
        artifact: ModelArtifact,
        settings: Settings,
        fallback: FeatureSource | None,
        breaker: CircuitBreaker | None = None,
        runtime: RuntimeResources | None = None,
    ) -> None:
        fs = artifact.manifest.feature_store
        self._group = settings.feature_group_name or fs.feature_group_name
        self._item_ids = artifact.item_ids
        self._names = list(artifact.manifest.item_feature_names)
        # The group holds the features that do not change with time; the others stay NaN here and
        # are computed at each request's as_of (twostage_rec.timelines).
        self._columns = [(c, feature_store_name(n)) for c, n in enumerate(self._names)
                         if feature_store_name(n) in fs.feature_types]
        self._fs_names = [name for _, name in self._columns]
        self._categories = {c: float(i) for i, c in enumerate(artifact.manifest.categories)}
        self._settings = settings
        self._fallback = fallback
        self._runtime = runtime or RuntimeResources(settings)
        self._breaker = breaker or self._runtime.breaker(self._group)

    def get(self, item_idx: np.ndarray, deadline: float) -> FeatureBatch:
        values = np.full((len(item_idx), len(self._names)), np.nan, dtype=np.float32)
        if not len(item_idx):
            return FeatureBatch(values)
        if not self._breaker.allow():
            return self._degrade(item_idx, values, list(range(len(item_idx))), BREAKER_OPEN, deadline)
        ids = [self._item_ids[i] for i in item_idx]
        read = read_records(self._runtime, self._breaker, self._group, ids, self._fs_names, deadline)
        for row, item_id in enumerate(ids):
            record = read.records.get(item_id)
            if record is not None:
                values[row] = self._parse(record)
        failed_rows = [row for row, item_id in enumerate(ids) if item_id in read.failed_ids]
        if not failed_rows:
            return FeatureBatch(values)
        return self._degrade(item_idx, values, failed_rows, read.problem or "", deadline)

    def _degrade(
        self, item_idx: np.ndarray, values: np.ndarray, failed_rows: list[int], problem: str, deadline: float
    ) -> FeatureBatch:
        """Fill ``failed_rows`` from the snapshot, or raise when that is not allowed."""
        if self._settings.feature_store_strict or self._fallback is None:
            raise FeatureSourceUnavailable(f"Feature Store read failed ({problem})")
        if problem != BREAKER_OPEN:  # while the breaker is open, its own log line says it all
            logger.warning("feature store degraded: %s; %d row(s) from the snapshot", problem, len(failed_rows))
        rows = np.asarray(failed_rows, dtype=np.int64)
        values[rows] = self._fallback.get(np.asarray(item_idx)[rows], deadline).values
        return FeatureBatch(values, degraded=True)

    def _parse(self, record: list[dict[str, str]]) -> np.ndarray:
        fields = {f["FeatureName"]: f.get("ValueAsString") for f in record}
        row = np.full(len(self._names), np.nan, dtype=np.float32)
        for col, name in self._columns:
            raw = fields.get(name)
            if raw is None:
                continue
            if name == schema.CATEGORY:
                row[col] = self._categories.get(raw, np.nan)
            else:
                try:
                    row[col] = float(raw)
                except ValueError:
                    pass  # an unparsable value is a missing value
        return row


def make_breaker(group: str, settings: Settings) -> CircuitBreaker:
    """The circuit breaker of one Feature Store group, named after it in its log lines."""
    return CircuitBreaker(f"feature-store:{group}", settings.breaker_failures, settings.breaker_open_s)


class RuntimeResources:
    """One process's Feature Store runtime client and thread pool, created on first use, and the
    circuit breaker of each Feature Store group read through them.

    The client and pool are created lazily and re-created after a fork: the model server may load
    the model in one process and fork workers, and neither a boto3 client nor a thread pool
    survives a fork. A forked worker keeps its own copy of each breaker.
    """

    def __init__(self, settings: Settings, client_factory: Callable[[Settings], Any] | None = None) -> None:
        self._settings = settings
        self._factory = client_factory or make_runtime_client
        self._pid: int | None = None
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, group: str) -> CircuitBreaker:
        """The circuit breaker of Feature Store group ``group``: one per group, made on first use."""
        with self._lock:
            found = self._breakers.get(group)
            if found is None:
                found = self._breakers[group] = make_breaker(group, self._settings)
            return found

    @property
    def breakers(self) -> list[CircuitBreaker]:
        """Every breaker :meth:`breaker` has made, in the order they were made."""
        with self._lock:
            return list(self._breakers.values())

    def acquire(self, deadline: float) -> tuple[Any, ThreadPoolExecutor, float]:
        """(client, pool, deadline): the deadline moves by the time spent creating them.

        Building the client happens once per worker process and can take a few hundred ms; it is
        not the Feature Store's latency, so it does not count against the caller's deadline.
        """
        started = time.monotonic()
        self._ensure()
        assert self._pool is not None
        return self._client, self._pool, deadline + (time.monotonic() - started)

    def prepare(self) -> None:
        """Create this process's client and pool now, if not done since the last fork.

        A request calls this before it starts its deadline clock: the first request of a worker
        must not spend its Feature Store budget building a client (~200 ms) and then answer
        ``degraded``. A failure is left to the read that needs the client, which reports it to
        its breaker, so nothing is raised here.
        """
        with contextlib.suppress(Exception):  # any factory failure: the read will meet it again
            self._ensure()

    def _ensure(self) -> None:
        pid = os.getpid()
        if self._pid != pid:
            with self._lock:
                if self._pid != pid:
                    self._client = self._factory(self._settings)
                    self._pool = ThreadPoolExecutor(
                        max_workers=self._settings.feature_store_parallelism, thread_name_prefix="featurestore"
                    )
                    self._pid = pid


@dataclass(frozen=True)
class RecordRead:
    """What a chunked ``batch_get_record`` read found."""

    records: dict[str, list[dict[str, str]]]  # record id -> its FeatureValues; ids not stored are absent
    failed_ids: frozenset[str]  # not read: unprocessed or errored after one retry, or their call failed
    problem: str | None  # why some ids failed, for the log


def read_records(
    runtime: RuntimeResources,
    breaker: CircuitBreaker,
    group: str,
    ids: Sequence[str],
    feature_names: Sequence[str],
    deadline: float,
) -> RecordRead:
    """Read records in parallel chunks of 100 within ``deadline``; report each call to ``breaker``.

    The caller has already asked ``breaker.allow()``. A call that raised or ran out of time is a
    failure; any call that answered is a success, even if some records stayed unprocessed.
    """
    try:
        client, pool, deadline = runtime.acquire(deadline)
    except Exception:
        breaker.record_failure()  # a probe must report, or the breaker would wait for it
        raise
    unique = list(dict.fromkeys(ids))
    chunks = [unique[s : s + BATCH_GET_LIMIT] for s in range(0, len(unique), BATCH_GET_LIMIT)]
    futures = {
        pool.submit(batch_get_with_retry, client, group, chunk, feature_names, deadline): chunk for chunk in chunks
    }
    done, not_done = wait(futures, timeout=max(0.0, deadline - time.monotonic()))
    records: dict[str, list[dict[str, str]]] = {}
    failed: set[str] = set()
    problem: str | None = None
    for future in not_done:
        future.cancel()
        failed.update(futures[future])
        problem = "deadline exceeded"
    for future in done:
        try:
            found, unprocessed = future.result()
        except Exception as exc:  # noqa: BLE001 - any client failure degrades the same way
            failed.update(futures[future])
            problem = f"{type(exc).__name__}: {exc}"
            continue
        records.update(found)
        failed.update(unprocessed)
    if problem is None:
        breaker.record_success()
        if failed:
            problem = f"{len(failed)} record(s) unprocessed after a retry"
    else:
        breaker.record_failure()
    return RecordRead(records, frozenset(failed), problem)


def batch_get_with_retry(
    client: Any, group: str, ids: Sequence[str], feature_names: Sequence[str] | None, deadline: float
) -> tuple[dict[str, list[dict[str, str]]], list[str]]:
    """One ``batch_get_record`` of at most 100 ids, retrying unprocessed and errored ids once.

    Returns (records by id, ids still unprocessed or errored). Ids that are neither returned,
    unprocessed nor errored do not exist in the store: they are simply absent, not a failure.
    """
    found: dict[str, list[dict[str, str]]] = {}
    pending = list(ids)
    for _attempt in range(2):  # the first call plus one retry
        if time.monotonic() >= deadline:
            raise TimeoutError("deadline exceeded before the retry of unprocessed records")
        identifier: dict[str, Any] = {"FeatureGroupName": group, "RecordIdentifiersValueAsString": pending}
        if feature_names is not None:
            identifier["FeatureNames"] = list(feature_names)
        response = client.batch_get_record(Identifiers=[identifier])
        asked = set(pending)
        for record in response.get("Records", []):
            record_id = record.get("RecordIdentifierValueAsString")
            if record_id in asked:
                found[record_id] = record["Record"]
        retry = {
            value
            for ident in response.get("UnprocessedIdentifiers", [])
            for value in ident.get("RecordIdentifiersValueAsString", [])
        }
        retry |= {e.get("RecordIdentifierValueAsString") for e in response.get("Errors", [])}
        pending = [i for i in pending if i in retry and i not in found]
        if not pending:
            break
    return found, pending


def make_runtime_client(settings: Settings) -> Any:
    """A ``sagemaker-featurestore-runtime`` client with tight timeouts and bounded retries."""
    import boto3
    from botocore.config import Config

    read_timeout = max(settings.feature_store_deadline_ms / 1000.0, 0.05)
    config = Config(
        region_name=settings.region,
        connect_timeout=settings.feature_store_connect_timeout_s,
        read_timeout=read_timeout,
        # total_max_attempts counts the first call; max_attempts would add one more.
        retries={"mode": "standard", "total_max_attempts": settings.feature_store_max_attempts},
        max_pool_connections=max(10, settings.feature_store_parallelism * 2),
    )
    kwargs: dict[str, Any] = {"config": config}
    if settings.region:
        kwargs["region_name"] = settings.region
    if settings.feature_store_endpoint_url:
        kwargs["endpoint_url"] = settings.feature_store_endpoint_url
    return boto3.session.Session().client("sagemaker-featurestore-runtime", **kwargs)


class CachedFeatureSource:
    """TTL- and size-bounded LRU cache of item-feature rows in front of another source.

    Item metadata changes slowly and BatchGetRecord has a per-account TPS quota, so most
    requests should be answered from memory. Degraded rows (snapshot fallbacks) are not cached.
    """

    def __init__(
        self, inner: FeatureSource, width: int, ttl_s: float, max_items: int, clock: Any = time.monotonic
    ) -> None:
        self._inner = inner
        self._width = width
        self._ttl = ttl_s
        self._max = max_items
        self._clock = clock
        self._rows: OrderedDict[int, tuple[float, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, item_idx: np.ndarray, deadline: float) -> FeatureBatch:
        now = self._clock()
        out: list[np.ndarray | None] = [None] * len(item_idx)
        missing: list[int] = []
        with self._lock:
            for pos, idx in enumerate(item_idx.tolist()):
                entry = self._rows.get(idx)
                if entry is not None and entry[0] > now:
                    self._rows.move_to_end(idx)
                    out[pos] = entry[1]
                else:
                    missing.append(pos)
            self.hits += len(item_idx) - len(missing)
            self.misses += len(missing)
        degraded = False
        if missing:
            fetched = self._inner.get(np.asarray(item_idx)[missing], deadline)
            degraded = fetched.degraded
            with self._lock:
                for pos, row in zip(missing, fetched.values):
                    out[pos] = row
                    if not degraded and self._max > 0 and self._ttl > 0:
                        self._rows[int(item_idx[pos])] = (now + self._ttl, row)
                        self._rows.move_to_end(int(item_idx[pos]))
                while len(self._rows) > self._max:
                    self._rows.popitem(last=False)
        values = np.vstack(out) if out else np.empty((0, self._width), dtype=np.float32)  # type: ignore[arg-type]
        return FeatureBatch(values.astype(np.float32, copy=False), degraded=degraded)


def make_feature_source(
    artifact: ModelArtifact, settings: Settings, runtime: RuntimeResources | None = None
) -> FeatureSource:
    """The source the settings ask for; the snapshot is always the fallback."""
    embedded = EmbeddedFeatureSource(artifact)
    if settings.feature_source == "embedded":
        return embedded
    store = FeatureStoreSource(artifact, settings, fallback=embedded, runtime=runtime)
    if settings.feature_source == "featurestore":
        return store
    width = len(artifact.manifest.item_feature_names)
    return CachedFeatureSource(store, width, settings.cache_ttl_s, settings.cache_max_items)
