"""Item features for the ranker: one interface, three sources.

- :class:`EmbeddedFeatureSource`: the snapshot shipped in the artifact (default, no AWS).
- :class:`FeatureStoreSource`: SageMaker Feature Store online store via boto3 ``batch_get_record``.
- :class:`CachedFeatureSource`: a TTL- and size-bounded cache in front of another source.

Every source returns a float32 matrix with the artifact's ``item_feature_names`` as columns, one
row per requested item, NaN where a value is missing (XGBoost treats NaN as missing).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np

from twostage_rec import schema
from twostage_rec.artifact import ModelArtifact
from twostage_rec.errors import FeatureSourceUnavailable
from twostage_rec.settings import Settings

logger = logging.getLogger(__name__)

BATCH_GET_LIMIT: Final = 100  # BatchGetRecord accepts at most 100 record ids per call


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

    The boto3 client and the thread pool are created lazily and re-created after a fork: the
    model server may load the model in one process and fork workers, and neither a boto3 client
    nor a thread pool survives a fork.
    """

    def __init__(self, artifact: ModelArtifact, settings: Settings, fallback: FeatureSource | None) -> None:
        fs = artifact.manifest.feature_store
        self._group = settings.feature_group_name or fs.feature_group_name
        self._item_ids = artifact.item_ids
        self._names = list(artifact.manifest.item_feature_names)
        self._fs_names = [feature_store_name(n) for n in self._names]
        self._categories = {c: float(i) for i, c in enumerate(artifact.manifest.categories)}
        self._settings = settings
        self._fallback = fallback
        self._pid: int | None = None
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def get(self, item_idx: np.ndarray, deadline: float) -> FeatureBatch:
        if not len(item_idx):
            return FeatureBatch(np.empty((0, len(self._names)), dtype=np.float32))
        values = np.full((len(item_idx), len(self._names)), np.nan, dtype=np.float32)
        ids = [self._item_ids[i] for i in item_idx]
        started = time.monotonic()
        client, pool = self._resources()
        # Building the client happens once per worker process and can take a few hundred ms;
        # it is not the Feature Store's latency, so it does not count against this deadline.
        deadline += time.monotonic() - started
        chunks = [range(s, min(s + BATCH_GET_LIMIT, len(ids))) for s in range(0, len(ids), BATCH_GET_LIMIT)]
        futures: dict[Future[list[int]], range] = {
            pool.submit(self._fetch_chunk, client, ids, chunk, values, deadline): chunk for chunk in chunks
        }
        done, not_done = wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        failed_rows: list[int] = []
        problem: str | None = None
        for future in not_done:
            future.cancel()
            failed_rows.extend(futures[future])
            problem = "deadline exceeded"
        for future in done:
            try:
                failed_rows.extend(future.result())
            except Exception as exc:  # noqa: BLE001 - any client failure degrades the same way
                failed_rows.extend(futures[future])
                problem = f"{type(exc).__name__}: {exc}"
        if not failed_rows:
            return FeatureBatch(values)
        if problem is None:
            problem = f"{len(failed_rows)} record(s) unprocessed after a retry"
        if self._settings.feature_store_strict or self._fallback is None:
            raise FeatureSourceUnavailable(f"Feature Store read failed ({problem})")
        logger.warning("feature store degraded: %s; %d row(s) from the snapshot", problem, len(failed_rows))
        rows = np.asarray(sorted(set(failed_rows)), dtype=np.int64)
        # A worker thread that outlived the deadline may still write these rows; overwrite after it.
        values = values.copy()
        values[rows] = self._fallback.get(np.asarray(item_idx)[rows], deadline).values
        return FeatureBatch(values, degraded=True)

    def _fetch_chunk(
        self, client: Any, ids: list[str], rows: range, out: np.ndarray, deadline: float
    ) -> list[int]:
        """Fill ``out`` for ``rows``; return the rows still unprocessed after one retry."""
        pending = {ids[r]: r for r in rows}
        for _attempt in range(2):  # the first call plus one retry of UnprocessedIdentifiers
            if time.monotonic() >= deadline:
                raise TimeoutError("deadline exceeded before the retry of unprocessed records")
            response = client.batch_get_record(
                Identifiers=[
                    {
                        "FeatureGroupName": self._group,
                        "RecordIdentifiersValueAsString": list(pending),
                        "FeatureNames": self._fs_names,
                    }
                ]
            )
            for record in response.get("Records", []):
                fields = {f["FeatureName"]: f["ValueAsString"] for f in record["Record"]}
                record_id = record.get("RecordIdentifierValueAsString")
                row = pending.pop(record_id, None)
                if row is not None:
                    out[row] = self._parse(fields)
            unprocessed = {
                value
                for ident in response.get("UnprocessedIdentifiers", [])
                for value in ident.get("RecordIdentifiersValueAsString", [])
            }
            errored = {e.get("RecordIdentifierValueAsString") for e in response.get("Errors", [])}
            # Ids neither returned, unprocessed nor errored do not exist in the store: NaN, not a failure.
            pending = {i: r for i, r in pending.items() if i in unprocessed or i in errored}
            if not pending:
                return []
        return list(pending.values())

    def _parse(self, fields: dict[str, str]) -> np.ndarray:
        row = np.full(len(self._names), np.nan, dtype=np.float32)
        for col, name in enumerate(self._fs_names):
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

    def _resources(self) -> tuple[Any, ThreadPoolExecutor]:
        pid = os.getpid()
        if self._pid != pid:
            with self._lock:
                if self._pid != pid:
                    self._client = make_runtime_client(self._settings)
                    self._pool = ThreadPoolExecutor(
                        max_workers=self._settings.feature_store_parallelism, thread_name_prefix="featurestore"
                    )
                    self._pid = pid
        assert self._pool is not None
        return self._client, self._pool


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


def make_feature_source(artifact: ModelArtifact, settings: Settings) -> FeatureSource:
    """The source the settings ask for; the snapshot is always the fallback."""
    embedded = EmbeddedFeatureSource(artifact)
    if settings.feature_source == "embedded":
        return embedded
    store = FeatureStoreSource(artifact, settings, fallback=embedded)
    if settings.feature_source == "featurestore":
        return store
    width = len(artifact.manifest.item_feature_names)
    return CachedFeatureSource(store, width, settings.cache_ttl_s, settings.cache_max_items)
