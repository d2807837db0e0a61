"""Writers for the concurrent-recording test: threads in a process, started by ``multiprocessing``.

A module of its own so a spawned child process can import it by name.
"""

from __future__ import annotations

import threading
from typing import Any

from local_test.feature_store.testing import make_clients
from training.events import UserEvent, record_events
from twostage_rec.artifact import UserHistorySchema


def record_after_barrier(endpoint_url: str, group: str, events: list[UserEvent], barrier: Any,
                         max_length: int) -> dict[str, Any]:
    """Wait at ``barrier`` with every other writer, then record ``events``; a summary of the report."""
    _, runtime = make_clients(endpoint_url)
    barrier.wait(timeout=60)
    report = record_events(runtime, UserHistorySchema(group), events, max_length, concurrency=1, show_progress=False)
    return {"stored": report.events_stored, "conflicts": report.conflicts,
            "failures": [f"{f.user_id}: {f.message}" for f in report.failures]}


def writer_process(endpoint_url: str, group: str, per_thread: list[list[UserEvent]], barrier: Any,
                   max_length: int, results: Any) -> None:
    """One process, one thread per event list, all released by the shared ``barrier``."""
    outcomes: list[dict[str, Any]] = []
    lock = threading.Lock()

    def run(events: list[UserEvent]) -> None:
        try:
            outcome = record_after_barrier(endpoint_url, group, events, barrier, max_length)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            outcome = {"stored": 0, "conflicts": 0, "failures": [repr(exc)]}
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=run, args=(events,)) for events in per_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(outcomes)
