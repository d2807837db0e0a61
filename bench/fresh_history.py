"""Fresh history through the container and the local Feature Store: issue 11's serving targets.

``docker run IMAGE serve`` (host networking) serves one model with the user-history group of the
local Feature Store server (a subprocess on this host, the group created and seeded with every
user's training history). Item features come from the model's snapshot throughout (no
``FEATURE_GROUP_NAME``), so the only Feature Store call of a request is the history read. Every
client sends one request at a time (concurrency 1).

1. *Added latency*: the same single-user and 100-user batch bodies with and without
   ``USER_HISTORY_FEATURE_GROUP_NAME``, in containers started in the order with, without,
   without, with (samples pooled per setting), so a load that drifts on a shared machine weighs
   on both alike. The local server's ``/_admin/stats`` counts the ``BatchGetRecord`` calls behind
   the timed requests.
2. *Freshness*: for a few users, record their current top recommendation with the real command
   (``python -m training events put``, a subprocess), then ask again until the item is gone from
   the answer: how many requests, and the time from the command's return.
3. *Store down*: a client sends requests back to back while the store is healthy, then refuses
   connections (the server killed) or hangs (an added latency far above the deadline), until every
   worker's circuit breaker has opened (read from the container's log), for a while with the
   breaker open, and after the store is back until every worker has closed its breaker. The
   breaker settings are short (:data:`BREAKER_OPEN_S`) so recovery takes seconds.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from bench.inprocess import single_body
from bench.served import Client, ContainerServer, Reply, load_summary, run_load
from bench.stats import summarize
from local_test.endpoint import DUMMY_CREDENTIALS, REGION, events_put_command
from local_test.feature_store.testing import FeatureStoreServer, make_clients
from twostage_rec.artifact import ModelArtifact, load_artifact

REPO: Final = Path(__file__).resolve().parent.parent
DEADLINE_MS: Final = 200.0  # serving's default FEATURE_STORE_DEADLINE_MS
BREAKER_FAILURES: Final = 5  # serving's default FEATURE_STORE_BREAKER_FAILURES
BREAKER_OPEN_S: Final = 1.0  # 5 s by default: shorter here, so a recovery is measured in seconds
HANG_MS: Final = 5000.0  # the hanging store's added latency: 25 times the deadline
BATCH: Final = 100
# Containers in this order: with / without the group alternate so that drift cancels; the last
# one stays up for the freshness and outage measurements.
ORDER: Final = (True, False, False, True)
FRESHNESS_ROUNDS: Final = 5
FRESHNESS_MAX_REQUESTS: Final = 50  # give up on a round after this many answers without the event
WARMUP: Final = 200  # single requests at concurrency 8: every worker answers (and builds its client)
BREAKER_WAIT_S: Final = 60.0  # for every worker's breaker to open, or close again
SETTLED: Final = 50  # consecutive answers that are not degraded: every worker has recovered
_TRANSITION: Final = re.compile(
    r"^(?P<time>\S+) .*pid=(?P<pid>\d+): circuit breaker feature-store:(?P<group>\S+): "
    r"(?P<change>closed -> open|open -> half-open|half-open -> open|half-open -> closed)")


def measure(image: str, model_dir: Path, n_requests: int, workers: int, seed: int = 0) -> dict[str, Any]:
    """Every measurement of the module docstring on ``model_dir`` served by ``image``.

    ``n_requests`` single requests per setting (a tenth as many batches of :data:`BATCH` users),
    and as many again for each outage's healthy and open phases. Raises ``RuntimeError`` when a
    container or the Feature Store does not start.
    """
    artifact = load_artifact(model_dir, verify_checksums=False)
    users = list(artifact.user_ids)
    rng = random.Random(seed)
    singles = [single_body(rng.choice(users)) for _ in range(n_requests)]
    batches = [_batch_body(rng.sample(users, min(BATCH, len(users)))) for _ in range(max(2, n_requests // 10))]
    os.environ.update(DUMMY_CREDENTIALS)  # boto3 signs every call; the local server accepts any credentials
    with FeatureStoreServer() as store:
        started = time.monotonic()
        group = seed_history_group(store.endpoint_url, artifact)
        seeded_s = time.monotonic() - started
        env = container_env(group, store.endpoint_url)
        blocks: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        for position, with_group in enumerate(ORDER):
            share = slice(position // 2, None, 2)  # each setting gets every body once over its two containers
            with ContainerServer(image, model_dir, workers, env if with_group else {}) as server:
                server.start(singles[0])
                run_load(server.host, server.port, singles[:WARMUP], 8)
                run_load(server.host, server.port, batches[:2], 1)
                blocks[with_group].append(
                    _latency_block(server, store if with_group else None, singles[share], batches[share]))
                if position < len(ORDER) - 1:
                    continue
                fresh = freshness(server, group, store.endpoint_url, artifact, rng.sample(users, FRESHNESS_ROUNDS))
                outages = {kind: outage(server, store, group, kind, singles, n_requests // 2)
                           for kind in ("refused", "hang")}
    return {
        "model": artifact.manifest.model_version,
        "n_users": len(users),
        "workers": workers,
        "settings": {"deadline_ms": DEADLINE_MS, "breaker_failures": BREAKER_FAILURES,
                     "breaker_open_s": BREAKER_OPEN_S, "hang_ms": HANG_MS, "batch": BATCH},
        "seed_s": round(seeded_s, 1),
        "latency": {kind: {"without": _pooled(blocks[False], kind), "with": _pooled(blocks[True], kind)}
                    for kind in ("single", "batch")},
        "calls": {kind: {"invocations": sum(b["calls"][kind]["invocations"] for b in blocks[True]),
                         "batch_get_record": sum(b["calls"][kind]["batch_get_record"] for b in blocks[True])}
                  for kind in ("single", "batch")},
        "freshness": fresh,
        "outages": outages,
    }


def seed_history_group(endpoint_url: str, artifact: ModelArtifact) -> str:
    """Create the model's user-history group in the local Feature Store and seed every user's
    training history; return the group's name."""
    from training.feature_store import create_user_history_group, seed_user_histories, user_history_schema

    sagemaker, runtime = make_clients(endpoint_url, REGION)
    schema = user_history_schema(artifact.manifest)
    create_user_history_group(sagemaker, schema, wait_s=30)
    report = seed_user_histories(runtime, artifact, schema, show_progress=False)
    if not report.ok:
        raise RuntimeError(f"seeding {schema.feature_group_name}: {report.events_failed} events not stored")
    return schema.feature_group_name


def container_env(group: str, endpoint_url: str) -> dict[str, str]:
    """What the container needs to read ``group`` from the local Feature Store, with this section's
    deadline and breaker settings spelled out."""
    return {
        "USER_HISTORY_FEATURE_GROUP_NAME": group,
        "FEATURE_STORE_ENDPOINT_URL": endpoint_url,
        "AWS_REGION": REGION,
        **DUMMY_CREDENTIALS,
        "FEATURE_STORE_DEADLINE_MS": f"{DEADLINE_MS:g}",
        "FEATURE_STORE_BREAKER_FAILURES": str(BREAKER_FAILURES),
        "FEATURE_STORE_BREAKER_OPEN_S": f"{BREAKER_OPEN_S:g}",
    }


def _batch_body(users: Sequence[str]) -> bytes:
    return b'{"instances": [' + b", ".join(single_body(u) for u in users) + b"]}"


def _latency_block(server: ContainerServer, store: FeatureStoreServer | None, singles: Sequence[bytes],
                   batches: Sequence[bytes]) -> dict[str, Any]:
    """Sequential replies to ``singles`` and ``batches``; with ``store``, the calls it counted for each."""
    out: dict[str, Any] = {"replies": {}, "calls": {}}
    with Client(server.host, server.port) as client:
        for kind, bodies in (("single", singles), ("batch", batches)):
            if store is not None:
                store.reset_stats()
            out["replies"][kind] = [client.invoke(body) for body in bodies]
            if store is not None:
                calls = store.stats().get("BatchGetRecord", 0)
                out["calls"][kind] = {"invocations": len(bodies), "batch_get_record": calls}
    return out


def _pooled(blocks: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    return load_summary([reply for block in blocks for reply in block["replies"][kind]])


def freshness(server: ContainerServer, group: str, endpoint_url: str, artifact: ModelArtifact,
              users: Sequence[str]) -> list[dict[str, Any]]:
    """Per user: record their top recommendation with ``python -m training events put``, then ask
    again until it is gone; requests and ms from the command's return to that answer."""
    field = artifact.manifest.item_id_field
    env = {**os.environ, **DUMMY_CREDENTIALS,
           "PYTHONPATH": os.pathsep.join([str(REPO / "code"), str(REPO)])}
    rounds = []
    for user_id in users:
        body = single_body(user_id)
        with Client(server.host, server.port) as client:
            before = _answer(client.invoke(body))
        item_id = before["recommendations"][0][field]
        command = events_put_command(group, user_id, item_id, REGION, artifact.manifest.history_length, endpoint_url)
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        returned = time.perf_counter()
        if result.returncode != 0:
            raise RuntimeError(f"events put for user {user_id} failed: {result.stderr.strip()[-500:]}")
        requests, answer = 0, before
        with Client(server.host, server.port) as client:  # a new connection, as a new caller would open
            while requests < FRESHNESS_MAX_REQUESTS:
                requests += 1
                answer = _answer(client.invoke(body))
                if item_id not in {r[field] for r in answer["recommendations"]}:
                    break
            else:
                requests = None
            seen_ms = (time.perf_counter() - returned) * 1000.0
        rounds.append({"user_id": user_id, "item_id": item_id, "command_s": round(returned - started, 2),
                       "requests": requests, "ms_after_return": round(seen_ms, 2), "degraded": answer["degraded"]})
    return rounds


def _answer(reply: Reply) -> dict[str, Any]:
    if reply.first is None:
        raise RuntimeError(f"/invocations answered HTTP {reply.status}")
    return reply.first


@dataclass(frozen=True)
class Sent:
    """One request of :class:`Traffic`: when it was sent (epoch seconds) and what came back."""

    at: float
    reply: Reply | None  # None: the connection broke


class Traffic:
    """One client sending ``bodies`` round and round, back to back, in a thread, until closed.

    Every request is kept with the wall-clock time it was sent, comparable with the container
    log's timestamps.
    """

    def __init__(self, host: str, port: int, bodies: Sequence[bytes]) -> None:
        self._address = (host, port)
        self._bodies = list(bodies)
        self.sent: list[Sent] = []  # appended by the thread only; list.append is atomic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = Client(*self._address)
        k = 0
        while not self._stop.is_set():
            at = time.time()
            try:
                reply: Reply | None = client.invoke(self._bodies[k % len(self._bodies)])
            except (OSError, ValueError):  # http.client's errors are OSErrors or ValueErrors
                reply = None
                client.close()
                client = Client(*self._address)
            self.sent.append(Sent(at, reply))
            k += 1
        client.close()

    def since(self, at: float) -> list[Sent]:
        """The requests sent at or after ``at`` (epoch seconds)."""
        return [s for s in list(self.sent) if s.at >= at]

    def wait_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``done`` every 50 ms; ``RuntimeError`` naming ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def outage(server: ContainerServer, store: FeatureStoreServer, group: str, kind: str, bodies: Sequence[bytes],
           n_phase: int) -> dict[str, Any]:
    """The store down (``refused``: the server killed; ``hang``: :data:`HANG_MS` added to every
    call) under back-to-back traffic: ``n_phase`` requests healthy, then until every worker's
    breaker opened, ``n_phase`` with the breakers open, then the store back until every worker
    closed its breaker (or :data:`SETTLED` answers in a row are not degraded)."""
    breakers = Breakers(server, group)
    with Traffic(server.host, server.port, bodies) as traffic:
        began = time.time()
        traffic.wait_until(lambda: len(traffic.since(began)) >= n_phase, BREAKER_WAIT_S * 10, "healthy requests")
        broke = time.time()
        if kind == "refused":
            store.kill()
        else:
            store.set_faults(latency_ms=HANG_MS)
        traffic.wait_until(lambda: len(breakers.changes(broke, "closed -> open")) >= server.workers, BREAKER_WAIT_S,
                           f"{server.workers} breakers to open")
        opened = time.time()
        traffic.wait_until(lambda: len(traffic.since(opened)) >= n_phase, BREAKER_WAIT_S * 10, "requests while open")
        restoring = time.time()
        if kind == "refused":
            store.start()
        else:
            store.clear_faults()
        back = time.time()
        traffic.wait_until(lambda: _recovered(traffic.since(back), breakers.changes(back, "half-open -> closed"),
                                              server.workers), BREAKER_WAIT_S, "the breakers to close")
    log = breakers.changes(began)
    return {
        "healthy": load_summary(_replies(traffic.sent, began, broke)),
        "trip": {"requests": len(_between(traffic.sent, broke, opened)), "seconds": round(opened - broke, 3),
                 "workers_opened": len({c.pid for c in log if c.change == "closed -> open"})},
        "open": {**load_summary(_replies(traffic.sent, opened, restoring)),
                 "probes": len([c for c in log if c.change == "open -> half-open" and opened <= c.at < restoring])},
        "restore_s": round(back - restoring, 3),
        "recovery": recovery(_between(traffic.sent, back, float("inf")), log, back),
    }


def _recovered(after: Sequence[Sent], closed: Sequence[BreakerChange], workers: int) -> bool:
    if len({c.pid for c in closed}) >= workers:
        return True
    tail = after[-SETTLED:]
    return len(tail) == SETTLED and all(s.reply is not None and s.reply.first and not s.reply.first["degraded"]
                                        for s in tail)


def _between(sent: Sequence[Sent], start: float, end: float) -> list[Sent]:
    return [s for s in sent if start <= s.at < end]


def _replies(sent: Sequence[Sent], start: float, end: float) -> list[Reply]:
    return [s.reply for s in _between(sent, start, end) if s.reply is not None]


def recovery(after: Sequence[Sent], log: Sequence[BreakerChange], back: float) -> dict[str, Any]:
    """How the service came back once the store did (at ``back``, epoch seconds).

    The first answer that is not degraded (requests and seconds after ``back``), the last one that
    still is, and per worker whether the first probe it let through after ``back`` closed its
    breaker (the breaker's log: ``open -> half-open`` when a probe goes out, then ``half-open ->
    closed`` or ``half-open -> open``).
    """
    degraded = [s.reply is None or s.reply.first is None or bool(s.reply.first["degraded"]) for s in after]
    first_ok = degraded.index(False) if False in degraded else None
    last_bad = max((i for i, bad in enumerate(degraded) if bad), default=None)
    probes: dict[int, list[str]] = {}
    for change in log:
        if change.at >= back and change.change != "closed -> open":
            probes.setdefault(change.pid, []).append(change.change)
    outcomes = {pid: _first_probe(changes) for pid, changes in probes.items()}
    return {
        "requests": None if first_ok is None else first_ok + 1,
        "seconds": None if first_ok is None else round(after[first_ok].at - back, 3),
        "last_degraded_request": None if last_bad is None else last_bad + 1,
        "last_degraded_s": None if last_bad is None else round(after[last_bad].at - back, 3),
        "first_probe_closed": outcomes,  # worker pid -> True / False (None: no probe seen)
    }


def _first_probe(changes: Sequence[str]) -> bool | None:
    """Did the first probe in ``changes`` (one worker's transitions, in order) close the breaker?"""
    if "open -> half-open" not in changes:
        # A worker that closed with no half-open line of its own after ``back``: its probe went out
        # just before the store was back and came back after; count it as not on the first probe.
        return None
    following = changes[changes.index("open -> half-open") + 1 :]
    return following[0] == "half-open -> closed" if following else None


@dataclass(frozen=True)
class BreakerChange:
    """One logged circuit-breaker transition of one worker."""

    at: float  # epoch seconds (the container log's timestamp)
    pid: int
    change: str


def breaker_changes(log: str, group: str) -> list[BreakerChange]:
    """The transitions of ``group``'s breakers in ``docker logs --timestamps`` output, in order."""
    out = []
    for line in log.splitlines():
        match = _TRANSITION.match(line)
        if match and match["group"].rstrip(":") == group:
            out.append(BreakerChange(_epoch(match["time"]), int(match["pid"]), match["change"]))
    return out


def _epoch(stamp: str) -> float:
    """Epoch seconds of Docker's RFC 3339 timestamp (nanoseconds cut to what datetime holds)."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{whole}.{(fraction or '0')[:6]:0<6}+00:00").timestamp()


class Breakers:
    """The breaker transitions a container has logged, read on demand (``docker logs --timestamps``)."""

    def __init__(self, server: ContainerServer, group: str) -> None:
        self._server = server
        self._group = group

    def changes(self, since: float, change: str | None = None) -> list[BreakerChange]:
        """Transitions logged at or after ``since`` (epoch seconds), only ``change`` if given."""
        found = breaker_changes(self._server.logs(timestamps=True), self._group)
        return [c for c in found if c.at >= since and (change is None or c.change == change)]


@contextlib.contextmanager
def _unused() -> Iterator[None]:
    yield
