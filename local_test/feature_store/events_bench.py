"""Benchmark: recording events into the user-history group, and reading histories back for serving.

    python -m local_test.feature_store.events_bench [--seconds 20] [--rate 1000] [--users 10000] [--writers 8]

Without ``--endpoint-url`` it starts its own local Feature Store (a subprocess, temporary database).
Each of ``--writers`` writer processes (independent, like Lambdas behind a stream) offers its share
of ``--rate`` events a second, each for a random one of ``--users`` users, for ``--seconds``, and
records what is queued (up to 100 events at a time) with ``training.events.merge_write``, the
compare-and-set that ``python -m training events put`` runs. Processes, not threads: botocore
costs about a millisecond of CPU per call, so threads of one process would be capped by the GIL.
Then every event is counted back with ``batch_get_record``: lost must be 0. Reported: achieved
events/s, CPU per event (writers and server, so the figure means something on a busy machine),
the latency of each event from its offer to its confirmed write (p50/p99), and the p50/p99 of
``FeatureStoreHistorySource.get`` for 1 and for 100 users (what serving adds per request).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from local_test.feature_store.bench import latency_summary
from local_test.feature_store.testing import FeatureStoreServer, make_clients
from training.events import RecordReport, merge_write
from training.feature_store import create_user_history_group
from twostage_rec.artifact import UserHistorySchema
from twostage_rec.features import BATCH_GET_LIMIT, batch_get_with_retry
from twostage_rec.history_store import FeatureStoreHistorySource, HistoryEvent, decode_history_record
from twostage_rec.settings import Settings

_REPO_ROOT = Path(__file__).resolve().parents[2]


def _writer(config: dict[str, Any]) -> dict[str, Any]:
    """One writer process: offer events on schedule in a thread, record them as they queue up."""
    _, runtime = make_clients(config["endpoint_url"])
    schema = UserHistorySchema(config["group"])
    rng = random.Random(config["seed"])
    inbox: queue.Queue[tuple[str, HistoryEvent, float] | None] = queue.Queue()
    offered: list[tuple[str, str, int]] = []
    rate, writer_id = config["rate"], config["seed"]

    def produce() -> None:
        # Event k is due at start + k / rate; the shared start lets every writer begin together.
        start = time.monotonic() + (config["start_at"] - time.time())
        for k in range(int(rate * config["seconds"])):
            due = start + k / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            user_id = f"user-{rng.randrange(config['users']):05d}"
            event = HistoryEvent(f"item-{writer_id}-{k}", int(time.time()))
            offered.append((user_id, event.item_id, event.timestamp))
            inbox.put((user_id, event, due))
        inbox.put(None)

    producer = threading.Thread(target=produce)
    producer.start()
    report, latencies, calls = RecordReport(), [], []
    cpu_start, done = time.process_time(), False
    while not done:
        taken = [inbox.get()]
        with contextlib.suppress(queue.Empty):
            while len(taken) < BATCH_GET_LIMIT and taken[-1] is not None:
                taken.append(inbox.get_nowait())
        done = taken[-1] is None
        events = [t for t in taken if t is not None]
        if not events:
            continue
        by_user: dict[str, list[HistoryEvent]] = {}
        for user_id, event, _due in events:
            by_user.setdefault(user_id, []).append(event)
        started = time.monotonic()
        report.add(merge_write(runtime, schema, by_user, config["history_length"]))
        finished = time.monotonic()
        calls.append(finished - started)
        latencies.extend(finished - due for _user, _event, due in events)
    producer.join()
    return {"offered": offered, "latencies": latencies, "calls": calls, "stored": report.events_stored,
            "writes": report.writes, "conflicts": report.conflicts, "failures": len(report.failures),
            "cpu_s": time.process_time() - cpu_start, "finished_at": time.time()}


def _run_writers(args: argparse.Namespace, endpoint_url: str, group: str) -> tuple[list[dict[str, Any]], float]:
    """Start the writer processes, return their results and the common start time (epoch)."""
    start_at = time.time() + 5.0  # time for every process to import boto3 and build its client
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT / "code"), str(_REPO_ROOT),
                                                    env.get("PYTHONPATH")) if p)
    children = []
    for writer in range(args.writers):
        config = {"endpoint_url": endpoint_url, "group": group, "rate": args.rate / args.writers,
                  "seconds": args.seconds, "users": args.users, "seed": args.seed * 1000 + writer,
                  "history_length": args.history_length, "start_at": start_at}
        children.append(subprocess.Popen(
            [sys.executable, "-m", "local_test.feature_store.events_bench", "--writer-config", json.dumps(config)],
            stdout=subprocess.PIPE, text=True, env=env))
    results = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"a writer process failed with exit status {child.returncode}")
        results.append(json.loads(out))
    return results, start_at


def _count_back(runtime: Any, schema: UserHistorySchema, users: list[str]) -> dict[str, set[tuple[str, int]]]:
    names = [schema.item_ids_feature_name, schema.timestamps_feature_name]
    stored: dict[str, set[tuple[str, int]]] = {}
    for start in range(0, len(users), BATCH_GET_LIMIT):
        found, unread = batch_get_with_retry(runtime, schema.feature_group_name, users[start : start + BATCH_GET_LIMIT],
                                             names, deadline=math.inf)
        if unread:
            raise RuntimeError(f"{len(unread)} records could not be read back")
        for user_id, record in found.items():
            stored[user_id] = {(e.item_id, e.timestamp) for e in decode_history_record(schema, record)}
    return stored


def _read_latency(endpoint_url: str, schema: UserHistorySchema, users: list[str], batch: int, calls: int,
                  rng: random.Random) -> list[float]:
    settings = Settings(region="us-east-1", feature_store_endpoint_url=endpoint_url,
                        user_history_feature_group_name=schema.feature_group_name, feature_store_deadline_ms=1000.0)
    source = FeatureStoreHistorySource(schema, settings)
    millis = []
    for i in range(calls + 20):  # the first 20 warm up (client creation, connections)
        asked = rng.sample(users, batch)
        started = time.perf_counter()
        answer = source.get(asked, time.monotonic() + 1.0)
        elapsed = (time.perf_counter() - started) * 1000.0
        if answer.degraded:
            raise RuntimeError("a history read degraded during the benchmark")
        if i >= 20:
            millis.append(elapsed)
    return millis


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit 1 if any event was lost."""
    parser = argparse.ArgumentParser(prog="python -m local_test.feature_store.events_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint-url", help="an already running local Feature Store (default: start one)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="events offered per second, all writers together")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--writers", type=int, default=8, help="writer processes")
    parser.add_argument("--history-length", type=int, default=50)
    parser.add_argument("--read-calls", type=int, default=300, help="history reads timed per batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writer-config", help=argparse.SUPPRESS)  # internal: run as one writer process
    args = parser.parse_args(argv)
    # The local server needs some credentials; serving's client looks for them in the environment.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    if args.writer_config:
        print(json.dumps(_writer(json.loads(args.writer_config))))
        return 0

    with contextlib.ExitStack() as stack:
        server = None if args.endpoint_url else stack.enter_context(FeatureStoreServer())
        endpoint_url = args.endpoint_url or server.endpoint_url  # type: ignore[union-attr]
        server_pid = server.pid if server else None
        sagemaker, runtime = make_clients(endpoint_url)
        schema = UserHistorySchema(f"bench-history-{uuid.uuid4().hex[:8]}")
        create_user_history_group(sagemaker, schema, wait_s=10)
        stack.callback(sagemaker.delete_feature_group, FeatureGroupName=schema.feature_group_name)

        server_cpu_before = _cpu_seconds(server_pid)
        results, start_at = _run_writers(args, endpoint_url, schema.feature_group_name)
        server_cpu = _cpu_seconds(server_pid) - server_cpu_before
        elapsed = max(r["finished_at"] for r in results) - start_at

        offered: dict[str, set[tuple[str, int]]] = {}
        for result in results:
            for user_id, item_id, timestamp in result["offered"]:
                offered.setdefault(user_id, set()).add((item_id, timestamp))
        n_offered = sum(len(events) for events in offered.values())
        stored_count = sum(r["stored"] for r in results)
        stored = _count_back(runtime, schema, sorted(offered))
        lost = sum(len(events - stored.get(user, set())) for user, events in offered.items())
        over_window = sum(1 for events in offered.values() if len(events) > args.history_length)
        latencies = [x for r in results for x in r["latencies"]]
        calls = [x for r in results for x in r["calls"]]
        writer_cpu = sum(r["cpu_s"] for r in results)

        print(f"endpoint {endpoint_url}; {args.writers} writer processes, {args.users} users, "
              f"{args.rate:.0f} events/s offered for {args.seconds:.0f} s")
        print(f"recorded {stored_count} of {n_offered} events in {elapsed:.1f} s: {stored_count / elapsed:.0f} "
              f"events/s; {sum(r['writes'] for r in results)} puts, {sum(r['conflicts'] for r in results)} lost "
              f"versions merged and retried, {sum(r['failures'] for r in results)} users failed")
        if server_pid is not None:
            per_event_ms = (writer_cpu + server_cpu) * 1000.0 / n_offered
            cores = os.cpu_count() or 1
            print(f"CPU per event: {writer_cpu * 1000.0 / n_offered:.2f} ms in the writers + "
                  f"{server_cpu * 1000.0 / n_offered:.2f} ms in the server = {per_event_ms:.2f} ms "
                  f"({cores} idle cores would sustain about {1000.0 * cores / per_event_ms:.0f} events/s)")
        print(latency_summary("event latency (offer -> confirmed write)", [x * 1000.0 for x in latencies], "events"))
        print(latency_summary(f"merge-write call (mean {n_offered / max(1, len(calls)):.1f} events each)",
                              [x * 1000.0 for x in calls]))
        print(f"counted back: {n_offered - lost} of {n_offered}; lost {lost}"
              + (f" ({over_window} users got more than {args.history_length} events)" if over_window else ""))

        users, rng = sorted(stored), random.Random(args.seed)
        for batch in (1, 100):
            millis = _read_latency(endpoint_url, schema, users, batch, args.read_calls, rng)
            print(latency_summary(f"FeatureStoreHistorySource.get, {batch} user(s)", millis))
    return 1 if lost or any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
