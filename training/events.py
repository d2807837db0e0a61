"""Recording interactions into the user-history feature group without losing any.

Each user has one online record holding their last N events (``twostage_rec.history_store``).
Recording an event is read-merge-write, and the Feature Store online API has no conditional
write, so two writers that read the same record at the same moment would each write their own
merge and one event would be lost. The online store does have one documented rule: PutRecord
replaces the online record only when the new record's EventTime is strictly greater than the
stored one's (otherwise it is "historic" and goes to the offline store only). That rule is a
compare-and-set if the EventTime is a version number derived from what was read: a writer reads
the record at version V (none: version 0), merges its events, and writes version V + 1. Every
writer that read V writes the same V + 1, so exactly one of them lands; a writer that read an
older version writes a number that is not greater than the stored one and is ignored, so a
stale merge can never overwrite a newer record. Each writer then reads the record back: if all
its events are there (or are older than the N newer events the record keeps), it is done;
otherwise another writer won that version, and it merges again from what it just read and
writes the next version, a bounded number of times with a jittered pause, then reports an error.
Consequences: the event time of a history record is a version counter (1, 2, 3, ...), not a
wall-clock time, so the group must not have a TTL (ExpiresAt = EventTime + TTL would expire every
record at once) and its offline store, if any, is not partitioned by real time; the event times
of the interactions themselves live in the record's ``timestamps`` list. A record deleted with
SoftDelete leaves a tombstone with the delete's (wall-clock) EventTime that version 1 cannot beat:
delete history records with HardDelete. Every writer and reader must use the same N (the
model's ``history_length``). A writer whose read or write keeps failing reports the user as not
stored; nothing else of that user is half-written, because a record is replaced whole or not at all.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tqdm import tqdm

from training.datasets.csvfile import read_csv_columns
from training.datasets.dataset import validate_events
from twostage_rec import schema as columns
from twostage_rec.artifact import UserHistorySchema
from twostage_rec.features import BATCH_GET_LIMIT, batch_get_with_retry
from twostage_rec.history_store import (
    HistoryEvent,
    MalformedHistoryRecord,
    decode_history_record,
    decode_record_version,
    encode_history_record,
    merge_events,
)

NO_RECORD_VERSION: Final = 0  # the version of a user without a record: the first write is 1
MAX_ROUNDS: Final = 20  # merge-write attempts per user before giving up on a contended record
_BACKOFF_S: Final = 0.01  # first jittered pause after a lost write; doubles, capped at _MAX_BACKOFF_S
_MAX_BACKOFF_S: Final = 0.5


@dataclass(frozen=True)
class UserEvent:
    """One interaction to record: who, what, when (epoch seconds)."""

    user_id: str
    item_id: str
    timestamp: int


@dataclass(frozen=True)
class UserFailure:
    """A user whose events were not stored, and why."""

    user_id: str
    events: int
    message: str


@dataclass
class RecordReport:
    """What a recording run did. ``ok`` only when every event is stored."""

    events_stored: int = 0
    users_stored: int = 0
    writes: int = 0  # PutRecord calls made
    conflicts: int = 0  # writes another writer won (each was merged again and retried)
    failures: list[UserFailure] = field(default_factory=list)

    @property
    def events_failed(self) -> int:
        return sum(f.events for f in self.failures)

    @property
    def ok(self) -> bool:
        return not self.failures

    def add(self, other: RecordReport) -> None:
        """Fold another (partial) report into this one."""
        self.events_stored += other.events_stored
        self.users_stored += other.users_stored
        self.writes += other.writes
        self.conflicts += other.conflicts
        self.failures.extend(other.failures)


def record_events(
    runtime_client: Any,
    schema: UserHistorySchema,
    events: Iterable[UserEvent],
    max_length: int,
    concurrency: int = 8,
    show_progress: bool = True,
    max_rounds: int = MAX_ROUNDS,
) -> RecordReport:
    """Record interactions: each user gets one read-merge-write with all of their events.

    ``max_length`` must be the model's ``history_length``. Events already in a user's record are
    not written again (recording is idempotent); events older than the ``max_length`` newest are
    accepted but not kept, as for any history that outgrows its window.
    """
    by_user: dict[str, list[HistoryEvent]] = {}
    for event in events:
        by_user.setdefault(event.user_id, []).append(HistoryEvent(event.item_id, event.timestamp))
    return store_histories(runtime_client, schema, by_user, max_length, concurrency, show_progress, max_rounds)


def seed_histories(
    runtime_client: Any,
    schema: UserHistorySchema,
    histories: Iterable[tuple[str, Sequence[HistoryEvent]]],
    max_length: int,
    concurrency: int = 8,
    show_progress: bool = True,
) -> RecordReport:
    """Merge each user's training history into their record (never replaces it).

    Re-seeding after a new model keeps the events recorded after its training data: they are
    merged with the training history, deduplicated, and the newest ``max_length`` kept.
    """
    by_user = {user_id: list(events) for user_id, events in histories if events}
    return store_histories(runtime_client, schema, by_user, max_length, concurrency, show_progress)


def store_histories(
    runtime_client: Any,
    schema: UserHistorySchema,
    by_user: Mapping[str, Sequence[HistoryEvent]],
    max_length: int,
    concurrency: int = 8,
    show_progress: bool = True,
    max_rounds: int = MAX_ROUNDS,
) -> RecordReport:
    """Merge-write every user's events, ``concurrency`` batches of users at a time."""
    users = list(by_user)
    # Batches of at most 100 users (one BatchGetRecord each), small enough to use every thread.
    size = max(1, min(BATCH_GET_LIMIT, math.ceil(len(users) / max(1, concurrency))))
    batches = [{u: by_user[u] for u in users[s : s + size]} for s in range(0, len(users), size)]
    report = RecordReport()
    total = sum(len(events) for events in by_user.values())
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, tqdm(
        total=total, desc=f"record {schema.feature_group_name}", unit="event", disable=not show_progress
    ) as bar:
        futures = [
            pool.submit(merge_write, runtime_client, schema, batch, max_length, max_rounds) for batch in batches
        ]
        for future in as_completed(futures):
            part = future.result()
            report.add(part)
            bar.update(part.events_stored + part.events_failed)
    return report


_State = tuple[int, list[HistoryEvent]]  # (version, events) of a user's record as read


def merge_write(
    runtime_client: Any,
    schema: UserHistorySchema,
    by_user: Mapping[str, Sequence[HistoryEvent]],
    max_length: int,
    max_rounds: int = MAX_ROUNDS,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> RecordReport:
    """Compare-and-set the records of up to 100 users (see the module docstring); never raises."""
    rng = rng or random.Random()
    report = RecordReport()
    pending = {user: list(events) for user, events in by_user.items()}
    errors: dict[str, str] = {}

    def fail(user: str, message: str) -> None:
        report.failures.append(UserFailure(user, len(pending.pop(user)), message))

    def read_and_settle() -> dict[str, _State]:
        """Read the pending users' records; users whose events are all there are done."""
        try:
            states, unread, malformed = _read_states(runtime_client, schema, list(pending))
        except Exception as exc:  # noqa: BLE001 - reported per user, the run goes on
            for user in list(pending):
                fail(user, f"reading its record failed: {type(exc).__name__}: {exc}")
            return {}
        for user, problem in malformed.items():
            fail(user, f"its stored record is malformed ({problem}); fix or hard-delete it")
        errors.update(dict.fromkeys(unread, "its record stayed unprocessed"))
        for user, (version, stored) in states.items():
            errors.pop(user, None)
            if version != NO_RECORD_VERSION and merge_events(stored, pending[user], max_length=max_length) == stored:
                report.events_stored += len(pending.pop(user))
                report.users_stored += 1
        return {user: state for user, state in states.items() if user in pending}

    states = read_and_settle()
    for attempt in range(max_rounds):
        if not pending:
            break
        written: set[str] = set()
        for user, (version, stored) in states.items():
            record = encode_history_record(
                schema, user, merge_events(stored, pending[user], max_length=max_length), version + 1)
            try:
                runtime_client.put_record(FeatureGroupName=schema.feature_group_name, Record=record)
            except Exception as exc:  # noqa: BLE001 - botocore has retried already
                fail(user, f"writing its record failed: {type(exc).__name__}: {exc}")
                continue
            written.add(user)
        report.writes += len(written)
        states = read_and_settle()
        lost = written & set(pending)
        report.conflicts += len(lost)
        for user in lost:
            if states.get(user, (None,))[0] == NO_RECORD_VERSION:
                errors[user] = "its record never appeared: a SoftDelete tombstone may hold a later EventTime"
        if pending and attempt + 1 < max_rounds:
            # Another writer won these versions: pause a random while so contenders spread out,
            # then merge from a fresh read rather than from the record read a moment ago.
            sleep(rng.uniform(0.0, min(_MAX_BACKOFF_S, _BACKOFF_S * 2**attempt)))
            states = read_and_settle()
    for user in list(pending):
        why = errors.get(user) or "other writers kept winning its record"
        fail(user, f"not stored after {max_rounds} merge-write attempts ({why})")
    return report


def _read_states(
    runtime_client: Any, schema: UserHistorySchema, users: list[str]
) -> tuple[dict[str, _State], list[str], dict[str, str]]:
    """(state of each user read, users not read, problem of each malformed record).

    A user without a record has version 0 and no events.
    """
    names = [schema.event_time_feature_name, schema.item_ids_feature_name, schema.timestamps_feature_name]
    states: dict[str, _State] = {}
    unread: list[str] = []
    malformed: dict[str, str] = {}
    for start in range(0, len(users), BATCH_GET_LIMIT):
        chunk = users[start : start + BATCH_GET_LIMIT]
        found, unprocessed = batch_get_with_retry(
            runtime_client, schema.feature_group_name, chunk, names, deadline=math.inf)
        unread.extend(unprocessed)
        for user in set(chunk) - set(unprocessed):
            record = found.get(user)
            try:
                states[user] = (NO_RECORD_VERSION, []) if record is None else (
                    decode_record_version(schema, record), decode_history_record(schema, record))
            except MalformedHistoryRecord as exc:
                malformed[user] = str(exc)
    return states, unread, malformed


def load_events_csv(path: Path, now: int) -> list[UserEvent]:
    """Events from a CSV file (``user_id,item_id[,timestamp]``), validated whole before anything is written.

    Timestamps are epoch seconds or ISO 8601 (naive = UTC); without the column every event is
    ``now``. Bad input raises :class:`~training.datasets.DataError` naming the file, line and problem.
    """
    wanted = (columns.USER_ID, columns.ITEM_ID, columns.TIMESTAMP)
    raw = read_csv_columns(path, wanted)
    raw.index = raw.index + 1  # data row r is line r + 1 of the file (line 1 is the header)
    frame = validate_events(raw, path, default_timestamp=now, unit="line")
    return [
        UserEvent(user_id, item_id, int(timestamp))
        for user_id, item_id, timestamp in zip(
            frame[columns.USER_ID].tolist(), frame[columns.ITEM_ID].tolist(), frame[columns.TIMESTAMP].tolist())
    ]
