"""Users' recent histories: the Feature Store record codec, merging, and the serving-side reader.

One record per user in the user-history group (:class:`~twostage_rec.artifact.UserHistorySchema`):
the record id is the user id, two String features hold JSON lists of item ids and epoch-second
timestamps (same length, oldest first), and the event-time feature (Fractional) is the record's
version, not a clock: ``training/events.py`` explains why and writes the records.

Serving reads the records of a request's users with one ``batch_get_record`` call (chunks of 100
in parallel beyond that), behind the same deadline, fallback and circuit-breaker rules as item
features. There is no cache: an event recorded a moment ago must change the next answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

import numpy as np

from twostage_rec.artifact import Manifest, ModelArtifact, UserHistorySchema
from twostage_rec.circuit_breaker import CircuitBreaker
from twostage_rec.errors import FeatureSourceUnavailable
from twostage_rec.features import BREAKER_OPEN, RuntimeResources, read_records
from twostage_rec.settings import Settings

logger = logging.getLogger(__name__)

_INT64 = 2**63


@dataclass(frozen=True)
class HistoryEvent:
    """One interaction of a user: the item and when (epoch seconds)."""

    item_id: str
    timestamp: int


class MalformedHistoryRecord(ValueError):
    """A user-history record that does not follow the codec (e.g. written by hand); one-line message."""


@dataclass(frozen=True)
class HistoryBatch:
    """Histories read for a request's users; users without a record are absent."""

    events: dict[str, list[HistoryEvent]]
    degraded: bool = False  # some users' histories could not be read (failure, timeout, malformed)


def merge_events(*event_lists: Iterable[HistoryEvent], max_length: int) -> list[HistoryEvent]:
    """The union of the lists, deduplicated on (item_id, timestamp), oldest first, the last ``max_length``.

    The sort is stable: events with the same timestamp keep the order in which they were first
    seen (earlier lists first), so merging is deterministic for every writer and reader.
    """
    unique = list(dict.fromkeys(event for events in event_lists for event in events))
    unique.sort(key=lambda event: event.timestamp)
    return unique[-max_length:] if max_length > 0 else []


def encode_history_record(
    schema: UserHistorySchema, user_id: str, events: Sequence[HistoryEvent], version: int
) -> list[dict[str, str]]:
    """The PutRecord ``Record`` of a user's history at ``version`` (the event-time feature)."""
    compact = (",", ":")
    return [
        {"FeatureName": schema.record_identifier_name, "ValueAsString": user_id},
        {"FeatureName": schema.event_time_feature_name, "ValueAsString": str(version)},
        {"FeatureName": schema.item_ids_feature_name,
         "ValueAsString": json.dumps([e.item_id for e in events], separators=compact, ensure_ascii=False)},
        {"FeatureName": schema.timestamps_feature_name,
         "ValueAsString": json.dumps([e.timestamp for e in events], separators=compact)},
    ]


def decode_history_record(schema: UserHistorySchema, record: Sequence[Mapping[str, Any]]) -> list[HistoryEvent]:
    """The events of a GetRecord/BatchGetRecord ``Record``; :class:`MalformedHistoryRecord` if it is not ours.

    Only the two list features are read, so a record fetched with just those decodes too.
    """
    fields = _fields(record)
    item_ids = _json_list(fields, schema.item_ids_feature_name)
    timestamps = _json_list(fields, schema.timestamps_feature_name)
    if len(item_ids) != len(timestamps):
        raise MalformedHistoryRecord(
            f"{schema.item_ids_feature_name} has {len(item_ids)} values but "
            f"{schema.timestamps_feature_name} has {len(timestamps)}")
    for item_id in item_ids:
        if not isinstance(item_id, str) or not item_id:
            raise MalformedHistoryRecord(f"{schema.item_ids_feature_name} holds {item_id!r}, not a non-empty string")
    for timestamp in timestamps:
        # bool is an int subclass, and a float such as 1.5 is not an epoch second.
        if type(timestamp) is not int or not -_INT64 <= timestamp < _INT64:
            raise MalformedHistoryRecord(
                f"{schema.timestamps_feature_name} holds {timestamp!r}, not an integer epoch second")
    return [HistoryEvent(item_id, timestamp) for item_id, timestamp in zip(item_ids, timestamps)]


def decode_record_version(schema: UserHistorySchema, record: Sequence[Mapping[str, Any]]) -> int:
    """A record's version: its event time, rounded down to a whole number (any Fractional is accepted)."""
    raw = _fields(record).get(schema.event_time_feature_name)
    try:
        # Decimal, not float: float("5.000000000000001") rounds to 5.0 and the next version would tie.
        return int(Decimal(str(raw)).to_integral_value(rounding=ROUND_FLOOR))
    except (InvalidOperation, ValueError, OverflowError):
        raise MalformedHistoryRecord(f"{schema.event_time_feature_name} is {raw!r}, not a number") from None


def _fields(record: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if not isinstance(record, (list, tuple)) or not all(isinstance(f, Mapping) for f in record):
        raise MalformedHistoryRecord("the record is not a list of FeatureValues")
    return {f.get("FeatureName"): f.get("ValueAsString") for f in record}


def _json_list(fields: Mapping[str, Any], name: str) -> list[Any]:
    raw = fields.get(name)
    if raw is None:
        raise MalformedHistoryRecord(f"feature {name} is missing")
    if not isinstance(raw, str):
        raise MalformedHistoryRecord(f"feature {name} is {type(raw).__name__}, not a string")
    try:
        value = json.loads(raw)
    except ValueError:  # includes JSONDecodeError and ints too long to convert
        raise MalformedHistoryRecord(f"feature {name} is not JSON: {raw[:60]!r}") from None
    if not isinstance(value, list):
        raise MalformedHistoryRecord(f"feature {name} is JSON {type(value).__name__}, not a list")
    return value


def artifact_user_history(artifact: ModelArtifact, user_idx: int) -> list[HistoryEvent]:
    """A user's last ``history_length`` interactions in the artifact, oldest first."""
    end = int(artifact.seen_indptr[user_idx + 1])
    start = max(int(artifact.seen_indptr[user_idx]), end - artifact.manifest.history_length)
    items = np.asarray(artifact.seen_indices[start:end])
    times = np.asarray(artifact.seen_timestamps[start:end])
    return [HistoryEvent(artifact.item_ids[i], int(t)) for i, t in zip(items.tolist(), times.tolist())]


class FeatureStoreHistorySource:
    """Reads users' history records from the online store within a deadline, behind a circuit breaker.

    A user without a record is absent from the answer (a new user is not a failure). A failed or
    timed-out read, or an open breaker, gives no events and ``degraded``, or raises
    :class:`FeatureSourceUnavailable` with ``feature_store_strict``. A malformed record is ignored
    for its user, logged once with the user id, and makes the answer ``degraded``, never an error.
    """

    def __init__(
        self,
        schema: UserHistorySchema,
        settings: Settings,
        breaker: CircuitBreaker | None = None,
        runtime: RuntimeResources | None = None,
    ) -> None:
        self.schema = schema
        self._settings = settings
        self._names = [schema.item_ids_feature_name, schema.timestamps_feature_name]
        self._runtime = runtime or RuntimeResources(settings)
        self._breaker = breaker or self._runtime.breaker(schema.feature_group_name)

    def get(self, user_ids: Sequence[str], deadline: float) -> HistoryBatch:
        """Histories of ``user_ids``; ``deadline`` is a ``time.monotonic()`` value."""
        if not user_ids:
            return HistoryBatch({})
        if not self._breaker.allow():
            self._failed(BREAKER_OPEN, len(set(user_ids)))
            return HistoryBatch({}, degraded=True)
        read = read_records(self._runtime, self._breaker, self.schema.feature_group_name, user_ids,
                            self._names, deadline)
        if read.failed_ids:
            self._failed(read.problem or "", len(read.failed_ids))
        events: dict[str, list[HistoryEvent]] = {}
        malformed = False
        for user_id, record in read.records.items():
            try:
                events[user_id] = decode_history_record(self.schema, record)
            except MalformedHistoryRecord as exc:
                logger.warning("user history record of user %r ignored: %s", user_id, exc)
                malformed = True
        return HistoryBatch(events, degraded=malformed or bool(read.failed_ids))

    def _failed(self, problem: str, n_users: int) -> None:
        """Raise in strict mode; otherwise log (except while the breaker is open: it logged)."""
        if self._settings.feature_store_strict:
            raise FeatureSourceUnavailable(f"Feature Store user-history read failed ({problem})")
        if problem != BREAKER_OPEN:
            logger.warning("user history degraded: %s; %d user(s) without Feature Store history", problem, n_users)


def make_history_source(
    manifest: Manifest, settings: Settings, runtime: RuntimeResources | None = None
) -> FeatureStoreHistorySource | None:
    """The Feature Store history reader, or None when ``USER_HISTORY_FEATURE_GROUP_NAME`` is unset.

    The group name comes from the settings; the feature names from the manifest when it has them.
    """
    name = settings.user_history_feature_group_name
    if not name:
        return None
    schema = manifest.user_history or UserHistorySchema(name)
    return FeatureStoreHistorySource(replace(schema, feature_group_name=name), settings, runtime=runtime)
