"""The state of the local Feature Store: feature groups and their online records, in SQLite.

Semantics follow the SageMaker API reference: every value travels as a string and is checked
against the group's feature types; a record replaces the stored one only when its EventTime is
strictly greater (an equal or older one is "historic": offline store only, so dropped here), which
writers can use as a compare-and-set on the EventTime (``training/events.py``); records past
ExpiresAt (EventTime + TtlDuration) are gone; SoftDelete keeps a tombstone carrying the delete's
EventTime, HardDelete removes the row. There is no offline store:
writes aimed only at it are accepted and dropped.

Durability: WAL with synchronous=NORMAL, so a committed write survives the process being killed
(not a power cut). Each thread gets its own connection; every write is one statement or one
``BEGIN IMMEDIATE`` transaction, so concurrent writers serialise inside SQLite.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

ACCOUNT_ID: Final = "000000000000"
FEATURE_TYPES: Final = ("Integral", "Fractional", "String")
RESERVED_FEATURE_NAMES: Final = frozenset({"is_deleted", "write_time", "api_invocation_time"})

_NAME_RE: Final = re.compile(r"[a-zA-Z0-9]([-_]*[a-zA-Z0-9]){0,63}")
_ARN_RE: Final = re.compile(r"arn:aws[a-z\-]*:sagemaker:[a-z0-9\-]*:[0-9]{12}:feature-group/(.+)")
_INTEGRAL_RE: Final = re.compile(r"[+-]?\d+")
_FRACTIONAL_RE: Final = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_ISO_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{3})?Z")
_SUMMARY_KEYS: Final = ("FeatureGroupName", "FeatureGroupArn", "CreationTime", "FeatureGroupStatus",
                         "OfflineStoreStatus")
_TTL_SECONDS: Final = {"Seconds": 1, "Minutes": 60, "Hours": 3600, "Days": 86400, "Weeks": 604800}

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS feature_groups (name TEXT PRIMARY KEY, description TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    group_name TEXT NOT NULL,
    record_id TEXT NOT NULL,
    event_time REAL NOT NULL,
    expires_at REAL,
    deleted INTEGER NOT NULL DEFAULT 0,
    features TEXT,
    PRIMARY KEY (group_name, record_id)
) WITHOUT ROWID;
"""


class ApiError(Exception):
    """An error answered to the caller: AWS error code, message and HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def validation_error(message: str) -> ApiError:
    """The runtime API's 400 ``ValidationError``."""
    return ApiError("ValidationError", message, 400)


def _short(value: str) -> str:
    """A value quoted for an error message, cut so a huge value cannot swamp the message."""
    return repr(value if len(value) <= 60 else value[:60] + "...")


def _group_not_found(name: str, code: str, status: int) -> ApiError:
    return ApiError(code, f"Resource Not Found: Amazon SageMaker can't find a FeatureGroup with name {name}", status)


def json_field(obj: Mapping[str, Any], key: str, kind: type, where: str, required: bool = True) -> Any:
    """``obj[key]`` checked against a JSON type, or a ValidationError naming the field."""
    value = obj.get(key)
    if value is None:
        if required:
            raise validation_error(f"{where}: missing required field {key}")
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise validation_error(f"{where}: field {key} has the wrong type {type(value).__name__}")
    return value


def ttl_seconds(ttl: Any, where: str) -> float | None:
    """Seconds of a ``TtlDuration`` ({Unit, Value}), None when absent."""
    if ttl is None:
        return None
    unit, value = (ttl.get("Unit"), ttl.get("Value")) if isinstance(ttl, dict) else (None, None)
    if unit not in _TTL_SECONDS or not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise validation_error(f"{where}: TtlDuration needs Unit in {sorted(_TTL_SECONDS)} and an integer Value >= 1")
    return float(value * _TTL_SECONDS[unit])


def parse_event_time(value: str, feature_type: str | None) -> float:
    """Epoch seconds of an EventTime: Fractional seconds or ISO-8601 ``yyyy-MM-ddTHH:mm:ss[.SSS]Z``.

    ``feature_type`` None accepts either form (DeleteRecord's EventTime parameter).
    """
    if feature_type != "String" and _FRACTIONAL_RE.fullmatch(value):
        return float(value)
    if feature_type != "Fractional" and _ISO_RE.fullmatch(value):
        fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if "." in value else "%Y-%m-%dT%H:%M:%SZ"
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:  # well formed but impossible, e.g. month 13
            pass
    expected = {"Fractional": "seconds since the epoch", "String": "yyyy-MM-ddTHH:mm:ssZ or yyyy-MM-ddTHH:mm:ss.SSSZ"}
    raise validation_error(f"EventTime {_short(value)} is not {expected.get(feature_type or '', 'a valid event time')}")


def format_expires_at(epoch_seconds: float) -> str:
    """ExpiresAt as the ISO-8601 UTC string the API returns."""
    moment = datetime.fromtimestamp(epoch_seconds, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_value(value: str, feature_type: str, where: str) -> None:
    # The length test keeps int() away from huge digit strings (which it refuses with ValueError).
    if feature_type == "Integral" and not (
        _INTEGRAL_RE.fullmatch(value) and len(value) <= 20 and -(2**63) <= int(value) < 2**63
    ):
        raise validation_error(f"{where}: {_short(value)} is not an Integral (64-bit integer)")
    if feature_type == "Fractional" and not _FRACTIONAL_RE.fullmatch(value):
        raise validation_error(f"{where}: {_short(value)} is not a Fractional (decimal number)")


@dataclass(frozen=True)
class FeatureGroup:
    """A feature group's definition, parsed once from its DescribeFeatureGroup document."""

    name: str
    record_id_name: str
    event_time_name: str
    feature_types: Mapping[str, str]
    list_features: frozenset[str]  # features with a CollectionType travel as ValueAsStringList
    online: bool
    ttl_seconds: float | None
    description: Mapping[str, Any]

    @classmethod
    def from_description(cls, description: Mapping[str, Any]) -> FeatureGroup:
        """Build from a stored DescribeFeatureGroup response."""
        definitions = description["FeatureDefinitions"]
        online = description.get("OnlineStoreConfig") or {}
        return cls(
            name=description["FeatureGroupName"],
            record_id_name=description["RecordIdentifierFeatureName"],
            event_time_name=description["EventTimeFeatureName"],
            feature_types={d["FeatureName"]: d["FeatureType"] for d in definitions},
            list_features=frozenset(d["FeatureName"] for d in definitions if d.get("CollectionType")),
            online=bool(online.get("EnableOnlineStore")),
            ttl_seconds=ttl_seconds(online.get("TtlDuration"), "OnlineStoreConfig"),
            description=description,
        )

    def check_record(self, record: Any) -> tuple[str, float, list[dict[str, Any]]]:
        """Validate a PutRecord ``Record``; return (record id, event time, normalised record)."""
        if not isinstance(record, list) or not record:
            raise validation_error("Record must be a non-empty list of FeatureValue")
        values: dict[str, dict[str, Any]] = {}
        for feature_value in record:
            name = json_field(feature_value if isinstance(feature_value, dict) else {}, "FeatureName", str, "Record")
            where = f"Record feature {name}"
            if name not in self.feature_types:
                raise validation_error(f"{where} is not defined in feature group {self.name}")
            if name in values:
                raise validation_error(f"{where} appears more than once")
            feature_type = self.feature_types[name]
            if name in self.list_features:
                items = json_field(feature_value, "ValueAsStringList", list, where)
                for item in items:
                    if not isinstance(item, str):
                        raise validation_error(f"{where}: ValueAsStringList must hold strings")
                    _check_value(item, feature_type, where)
                values[name] = {"FeatureName": name, "ValueAsStringList": items}
            else:
                value = json_field(feature_value, "ValueAsString", str, where)
                _check_value(value, feature_type, where)
                values[name] = {"FeatureName": name, "ValueAsString": value}
        for required in (self.record_id_name, self.event_time_name):
            if not values.get(required, {}).get("ValueAsString"):
                raise validation_error(f"Record is missing required feature {required} of feature group {self.name}")
        event_time_value = values[self.event_time_name]["ValueAsString"]
        event_time = parse_event_time(event_time_value, self.feature_types[self.event_time_name])
        return values[self.record_id_name]["ValueAsString"], event_time, list(values.values())


class Store:
    """Feature groups and online records in one SQLite file, safe to share between threads."""

    def __init__(self, db_path: str | Path) -> None:
        self._db_path = str(db_path)
        self._local = threading.local()
        self._lock = threading.Lock()  # keeps the group cache and the feature_groups table in step
        conn = self._connection()
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        rows = conn.execute("SELECT description FROM feature_groups").fetchall()
        self._groups = {g.name: g for g in (FeatureGroup.from_description(json.loads(r[0])) for r in rows)}

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: autocommit, so each statement commits on its own unless we BEGIN.
            conn = sqlite3.connect(self._db_path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a read-then-write cannot deadlock another writer.
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def release_connection(self) -> None:
        """Close the calling thread's connection; call it when a server thread finishes."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def group(self, name_or_arn: str, code: str = "ResourceNotFound", status: int = 404) -> FeatureGroup:
        """The group named by a name or ARN, or ``ApiError(code, status)``."""
        match = _ARN_RE.fullmatch(name_or_arn)
        name = match.group(1) if match else name_or_arn
        with self._lock:
            group = self._groups.get(name)
        if group is None:
            raise _group_not_found(name, code, status)
        return group

    # -- control plane (the ``sagemaker`` JSON API) --------------------------------------------

    def create_group(self, request: Mapping[str, Any], region: str) -> dict[str, Any]:
        """CreateFeatureGroup: validate, store, and report the group as Created at once."""
        name = json_field(request, "FeatureGroupName", str, "CreateFeatureGroup")
        if not _NAME_RE.fullmatch(name):
            raise validation_error(f"FeatureGroupName {name!r} must match [a-zA-Z0-9]([-_]*[a-zA-Z0-9]){{0,63}}")
        definitions = json_field(request, "FeatureDefinitions", list, "CreateFeatureGroup")
        if not 1 <= len(definitions) <= 2500:
            raise validation_error("FeatureDefinitions must hold 1 to 2500 features")
        types: dict[str, str] = {}
        for definition in definitions:
            definition = definition if isinstance(definition, dict) else {}
            feature = json_field(definition, "FeatureName", str, "FeatureDefinitions")
            feature_type = json_field(definition, "FeatureType", str, f"FeatureDefinition {feature}")
            if not _NAME_RE.fullmatch(feature) or feature in RESERVED_FEATURE_NAMES or feature in types:
                raise validation_error(f"FeatureName {feature!r} is invalid, reserved or duplicated")
            if feature_type not in FEATURE_TYPES:
                raise validation_error(f"FeatureType {feature_type!r} of {feature} must be one of {FEATURE_TYPES}")
            types[feature] = feature_type
        record_id = json_field(request, "RecordIdentifierFeatureName", str, "CreateFeatureGroup")
        event_time = json_field(request, "EventTimeFeatureName", str, "CreateFeatureGroup")
        for role, feature, allowed in (("RecordIdentifierFeatureName", record_id, ("Integral", "String")),
                                       ("EventTimeFeatureName", event_time, ("Fractional", "String"))):
            if feature not in types:
                raise validation_error(f"{role} {feature!r} is not one of the FeatureDefinitions")
            if types[feature] not in allowed:
                raise validation_error(f"{role} {feature!r} must have FeatureType {' or '.join(allowed)}")
        online = json_field(request, "OnlineStoreConfig", dict, "CreateFeatureGroup", required=False)
        offline = json_field(request, "OfflineStoreConfig", dict, "CreateFeatureGroup", required=False)
        if online is None and offline is None:
            raise validation_error("You must include at least one of OnlineStoreConfig and OfflineStoreConfig")
        ttl_seconds((online or {}).get("TtlDuration"), "OnlineStoreConfig")

        now = time.time()
        description: dict[str, Any] = {
            "FeatureGroupArn": f"arn:aws:sagemaker:{region}:{ACCOUNT_ID}:feature-group/{name}",
            "FeatureGroupName": name,
            "RecordIdentifierFeatureName": record_id,
            "EventTimeFeatureName": event_time,
            "FeatureDefinitions": definitions,
            "CreationTime": now,
            "LastModifiedTime": now,
            "FeatureGroupStatus": "Created",
            "NextToken": "",
        }
        for key in ("OnlineStoreConfig", "OfflineStoreConfig", "ThroughputConfig", "RoleArn", "Description"):
            if key in request:
                description[key] = request[key]
        if offline is not None:
            description["OfflineStoreStatus"] = {"Status": "Active"}
        group = FeatureGroup.from_description(description)
        with self._lock:
            if name in self._groups:
                raise ApiError("ResourceInUse", f"Resource Already Exists: FeatureGroup with name {name} "
                                                "already exists. Choose a different name.")
            with self._transaction() as conn:
                conn.execute("DELETE FROM records WHERE group_name = ?", (name,))  # leftovers of a racing put
                conn.execute("INSERT INTO feature_groups VALUES (?, ?)", (name, json.dumps(description)))
            self._groups[name] = group
        return {"FeatureGroupArn": description["FeatureGroupArn"]}

    def describe_group(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """DescribeFeatureGroup."""
        name = json_field(request, "FeatureGroupName", str, "DescribeFeatureGroup")
        return dict(self.group(name, "ResourceNotFound", 400).description)

    def delete_group(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """DeleteFeatureGroup: the group and its online records go at once."""
        name_or_arn = json_field(request, "FeatureGroupName", str, "DeleteFeatureGroup")
        name = self.group(name_or_arn, "ResourceNotFound", 400).name
        with self._lock:
            with self._transaction() as conn:
                conn.execute("DELETE FROM feature_groups WHERE name = ?", (name,))
                conn.execute("DELETE FROM records WHERE group_name = ?", (name,))
            self._groups.pop(name, None)
        return {}

    def list_groups(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """ListFeatureGroups with its filters, sorting and NextToken paging."""
        with self._lock:
            descriptions = [g.description for g in self._groups.values()]
        contains = json_field(request, "NameContains", str, "ListFeatureGroups", required=False) or ""
        after, before = request.get("CreationTimeAfter"), request.get("CreationTimeBefore")
        summaries = [
            {key: d[key] for key in _SUMMARY_KEYS if key in d}
            for d in descriptions
            if contains in d["FeatureGroupName"]
            and request.get("FeatureGroupStatusEquals") in (None, "Created")
            and request.get("OfflineStoreStatusEquals") in (None, d.get("OfflineStoreStatus", {}).get("Status"))
            and (after is None or d["CreationTime"] > _epoch(after))
            and (before is None or d["CreationTime"] < _epoch(before))
        ]
        sort_by = request.get("SortBy") or ""
        sort_key = {"Name": "FeatureGroupName", "FeatureGroupStatus": "FeatureGroupStatus"}.get(sort_by, "CreationTime")
        summaries.sort(key=lambda s: s[sort_key], reverse=request.get("SortOrder") in (None, "Descending"))
        token = request.get("NextToken") or "0"
        if not token.isdigit():
            raise validation_error(f"NextToken {token!r} is not one this server issued")
        size = request.get("MaxResults") or 10
        if not isinstance(size, int) or not 1 <= size <= 100:
            raise validation_error(f"MaxResults {size!r} must be an integer from 1 to 100")
        start = int(token)
        response: dict[str, Any] = {"FeatureGroupSummaries": summaries[start : start + size]}
        if start + size < len(summaries):
            response["NextToken"] = str(start + size)
        return response

    # -- runtime (the ``sagemaker-featurestore-runtime`` REST API) ------------------------------

    def put_record(self, group_ref: str, record: Any, target_stores: Any = None, ttl: Any = None) -> None:
        """PutRecord: store when the EventTime is strictly greater than the stored record's, or it expired.

        AWS: "If a new record's EventTime is greater, the new record is written to both the
        OnlineStore and OfflineStore. Otherwise, the record is a historic record and it is written
        only to the OfflineStore." One statement, so the comparison and the write are atomic.
        """
        group = self.group(group_ref, "ValidationError", 400)
        record_id, event_time, values = group.check_record(record)
        record_ttl = ttl_seconds(ttl, "PutRecord")
        if not group.online or (target_stores is not None and "OnlineStore" not in target_stores):
            return
        ttl_s = record_ttl if record_ttl is not None else group.ttl_seconds
        expires_at = event_time + ttl_s if ttl_s is not None else None
        self._connection().execute(
            """INSERT INTO records VALUES (?, ?, ?, ?, 0, ?)
               ON CONFLICT (group_name, record_id) DO UPDATE SET
                   event_time = excluded.event_time, expires_at = excluded.expires_at,
                   deleted = 0, features = excluded.features
               WHERE excluded.event_time > records.event_time OR records.expires_at <= ?""",
            (group.name, record_id, event_time, expires_at, json.dumps(values), time.time()),
        )

    def get_records(
        self, group: FeatureGroup, record_ids: Sequence[str], feature_names: Sequence[str] | None = None
    ) -> dict[str, tuple[list[dict[str, Any]], float | None]]:
        """Live records by id (misses absent) as {id: (FeatureValues, ExpiresAt or None)}."""
        if not group.online:
            raise validation_error(f"Feature group {group.name} has no online store")
        wanted = None
        if feature_names is not None:
            unknown = [f for f in feature_names if f not in group.feature_types]
            if unknown:
                raise validation_error(f"FeatureNames {unknown} are not defined in feature group {group.name}")
            wanted = set(feature_names)
        ids = list(dict.fromkeys(record_ids))
        if not ids:
            return {}
        rows = self._connection().execute(
            f"""SELECT record_id, features, expires_at FROM records
                WHERE group_name = ? AND deleted = 0 AND (expires_at IS NULL OR expires_at > ?)
                AND record_id IN ({",".join("?" * len(ids))})""",
            (group.name, time.time(), *ids),
        ).fetchall()
        found = {}
        for record_id, features, expires_at in rows:
            values = json.loads(features)
            if wanted is not None:
                values = [v for v in values if v["FeatureName"] in wanted]
            found[record_id] = (values, expires_at)
        return {i: found[i] for i in ids if i in found}

    def delete_record(self, group_ref: str, record_id: str, event_time: str,
                      target_stores: Sequence[str] | None, mode: str) -> None:
        """DeleteRecord: SoftDelete leaves a tombstone, HardDelete removes the row.

        A delete older than the stored record is ignored (SoftDelete) or rejected (HardDelete).
        """
        group = self.group(group_ref, "ValidationError", 400)
        if mode not in ("SoftDelete", "HardDelete"):
            raise validation_error(f"DeletionMode {mode!r} must be SoftDelete or HardDelete")
        deleted_at = parse_event_time(event_time, None)
        if not group.online or (target_stores and "OnlineStore" not in target_stores):
            return
        with self._transaction() as conn:
            row = conn.execute(
                """SELECT event_time FROM records
                   WHERE group_name = ? AND record_id = ? AND (expires_at IS NULL OR expires_at > ?)""",
                (group.name, record_id, time.time()),
            ).fetchone()
            if row is None:
                return
            if deleted_at < row[0]:
                if mode == "HardDelete":
                    raise validation_error(
                        f"EventTime {event_time} is older than the stored record's EventTime; nothing was deleted")
                return
            if mode == "HardDelete":
                conn.execute("DELETE FROM records WHERE group_name = ? AND record_id = ?", (group.name, record_id))
            else:
                conn.execute(
                    """UPDATE records SET deleted = 1, features = NULL, expires_at = NULL, event_time = ?
                       WHERE group_name = ? AND record_id = ?""",
                    (deleted_at, group.name, record_id),
                )


def _epoch(value: Any) -> float:
    """A JSON-protocol timestamp (epoch number or ISO-8601 string) as epoch seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise validation_error(f"timestamp {value!r} is neither epoch seconds nor ISO-8601") from None
