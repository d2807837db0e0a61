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
import http.client
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from bench.inprocess import batch_bodies, single_body
from bench.served import Client, ContainerServer, Reply, load_summary, run_load
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
PHASE_TIMEOUT_S: Final = 600.0  # for a phase's requests: only a stuck server takes this long
LOG_POLL_S: Final = 0.2
SETTLED: Final = 50  # consecutive answers that are not degraded: every worker has recovered
_TRANSITION: Final = re.compile(
    r"^(?P<time>\S+) .*pid=(?P<pid>\d+): circuit breaker feature-store:(?P<group>\S+): "
    r"(?P<change>closed -> open|open -> half-open|half-open -> open|half-open -> closed)")


def measure(image: str, model_dir: Path, n_requests: int, workers: int, log: Path, seed: int = 0) -> dict[str, Any]:
    """Every measurement of the module docstring on ``model_dir`` served by ``image``.

    ``n_requests`` single requests per setting (a tenth as many batches of :data:`BATCH` users),
    and half as many for each outage's healthy and open phases. The local Feature Store's own
    output goes to ``log``. Raises ``RuntimeError`` when a container or the Feature Store does not
    start.
    """
    artifact = load_artifact(model_dir, verify_checksums=False)
    users = list(artifact.user_ids)
    rng = random.Random(seed)
    singles = [single_body(rng.choice(users)) for _ in range(n_requests)]
    size = min(BATCH, len(users))
    batches = batch_bodies([u for _ in range(max(2, n_requests // 10)) for u in rng.sample(users, size)], size)
    with contextlib.ExitStack() as stack:
        with stderr_to(log):
            store = stack.enter_context(FeatureStoreServer())
        started = time.monotonic()
        group = seed_history_group(store.endpoint_url, artifact)
        seeded_s = time.monotonic() - started
        env = container_env(group, store.endpoint_url)
        blocks: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        fresh: list[dict[str, Any]] = []
        outages: dict[str, dict[str, Any]] = {}
        for position, with_group in enumerate(ORDER):
            share = slice(position // 2, None, 2)  # each setting gets every body once over its two containers
            with ContainerServer(image, model_dir, workers, env if with_group else {}) as server:
                server.start(singles[0])
                run_load(server.host, server.port, singles[:WARMUP], 8)
                run_load(server.host, server.port, batches[:2], 1)
                blocks[with_group].append(
                    _latency_block(server, store if with_group else None, singles[share], batches[share]))
                if position == len(ORDER) - 1:  # the last container (with the group) stays for the rest
                    fresh = freshness(server, group, store.endpoint_url, artifact,
                                      rng.sample(users, FRESHNESS_ROUNDS))
                    outages = {kind: outage(server, store, group, kind, singles, n_requests // 2, log)
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


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Point this process's stderr (file descriptor 2) at ``path`` meanwhile: a child started now keeps it.

    The local Feature Store prints a traceback for every client that hung up before its answer
    (each call of the hanging store): those belong in a log, not in the bench's output.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


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
        reflected: int | None = None  # the request whose answer no longer holds the item
        with Client(server.host, server.port) as client:  # a new connection, as a new caller would open
            for attempt in range(1, FRESHNESS_MAX_REQUESTS + 1):
                answer = _answer(client.invoke(body))
                if item_id not in {r[field] for r in answer["recommendations"]}:
                    reflected = attempt
                    break
            seen_ms = (time.perf_counter() - returned) * 1000.0
        rounds.append({"user_id": user_id, "item_id": item_id, "command_s": round(returned - started, 2),
                       "requests": reflected, "ms_after_return": round(seen_ms, 2), "degraded": answer["degraded"]})
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
            except (OSError, http.client.HTTPException, ValueError):  # a broken connection or body
                reply = None
                client.close()
                client = Client(*self._address)
            self.sent.append(Sent(at, reply))
            k += 1
        client.close()

    def since(self, at: float) -> list[Sent]:
        """The requests sent at or after ``at`` (epoch seconds)."""
        return [s for s in list(self.sent) if s.at >= at]

    def count_since(self, at: float) -> int:
        """How many requests were sent at or after ``at``."""
        return len(self.since(at))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def wait_until(done: Callable[[], bool], timeout: float, poll_s: float = 0.05) -> bool:
    """Poll ``done`` until it is true (True) or ``timeout`` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def outage(server: ContainerServer, store: FeatureStoreServer, group: str, kind: str, bodies: Sequence[bytes],
           n_phase: int, log: Path) -> dict[str, Any]:
    """The store down (``refused``: the server killed; ``hang``: :data:`HANG_MS` added to every
    call) under back-to-back traffic: ``n_phase`` requests healthy, then until every worker's
    breaker opened, ``n_phase`` with the breakers open, then the store back until every worker
    closed its breaker (or :data:`SETTLED` answers in a row are not degraded)."""
    breakers = Breakers(server, group)
    logged = LOG_POLL_S  # each look at the log runs `docker logs`: not every 50 ms
    with Traffic(server.host, server.port, bodies) as traffic:
        began = time.time()
        _require(wait_until(lambda: traffic.count_since(began) >= n_phase, PHASE_TIMEOUT_S), "healthy requests")
        broke = time.time()
        if kind == "refused":
            store.kill()
        else:
            store.set_faults(latency_ms=HANG_MS)
        # A worker that gets no request never opens: go on with those that did.
        wait_until(lambda: len(breakers.changes(broke, "closed -> open")) >= server.workers, BREAKER_WAIT_S, logged)
        _require(bool(breakers.changes(broke, "closed -> open")), "a circuit breaker to open")
        opened = time.time()
        _require(wait_until(lambda: traffic.count_since(opened) >= n_phase, PHASE_TIMEOUT_S), "requests while open")
        restoring = time.time()
        if kind == "refused":
            with stderr_to(log):
                store.start()
        else:
            store.clear_faults()
        back = time.time()
        wait_until(lambda: _recovered(traffic.since(back), breakers.changes(back, "half-open -> closed"),
                                      server.workers), BREAKER_WAIT_S, logged)
    changes = breakers.changes(began)
    return {
        "healthy": load_summary(_replies(traffic.sent, began, broke)),
        "trip": {"requests": len(_between(traffic.sent, broke, opened)), "seconds": round(opened - broke, 3),
                 "workers_opened": len({c.pid for c in changes if c.change == "closed -> open"})},
        "open": {**load_summary(_replies(traffic.sent, opened, restoring)),
                 "probes": len([c for c in changes
                                if c.change == "open -> half-open" and opened <= c.at < restoring])},
        "restore_s": round(back - restoring, 3),
        "recovery": recovery(_between(traffic.sent, back, float("inf")), changes, back),
    }


def _require(done: bool, what: str) -> None:
    if not done:
        raise RuntimeError(f"timed out waiting for {what}")


def _recovered(after: Sequence[Sent], closed: Sequence[BreakerChange], workers: int) -> bool:
    if len({c.pid for c in closed}) >= workers:
        return True
    tail = after[-SETTLED:]
    return len(tail) == SETTLED and not any(_degraded(s) for s in tail)


def _degraded(sent: Sent) -> bool:
    """Degraded, or no answer at all: either way not the service recovered."""
    answer = sent.reply.first if sent.reply is not None else None
    return answer is None or bool(answer["degraded"])


def _answered(sent: Sent) -> float:
    """When the answer came back (epoch seconds); the send time when none did."""
    return sent.at + (sent.reply.latency_ms / 1000.0 if sent.reply is not None else 0.0)


def _between(sent: Sequence[Sent], start: float, end: float) -> list[Sent]:
    return [s for s in sent if start <= s.at < end]


def _replies(sent: Sequence[Sent], start: float, end: float) -> list[Reply]:
    return [s.reply for s in _between(sent, start, end) if s.reply is not None]


def recovery(after: Sequence[Sent], log: Sequence[BreakerChange], back: float) -> dict[str, Any]:
    """How the service came back once the store did (at ``back``, epoch seconds).

    The first answer that is not degraded (requests, and seconds from ``back`` to its arrival), the
    last one that still is, and per worker whether the first probe it let through after ``back`` closed its
    breaker (the breaker's log: ``open -> half-open`` when a probe goes out, then ``half-open ->
    closed`` or ``half-open -> open``).
    """
    degraded = [_degraded(s) for s in after]
    first_ok = degraded.index(False) if False in degraded else None
    last_bad = max((i for i, bad in enumerate(degraded) if bad), default=None)
    probes: dict[int, list[str]] = {}
    for change in log:
        if change.at >= back and change.change != "closed -> open":
            probes.setdefault(change.pid, []).append(change.change)
    outcomes = {pid: _first_probe(changes) for pid, changes in probes.items()}
    return {
        "requests": None if first_ok is None else first_ok + 1,
        "seconds": None if first_ok is None else round(_answered(after[first_ok]) - back, 3),
        "last_degraded_request": None if last_bad is None else last_bad + 1,
        "last_degraded_s": None if last_bad is None else round(_answered(after[last_bad]) - back, 3),
        "first_probe_closed": outcomes,  # worker pid -> True / False (None: no probe seen)
    }


def _first_probe(changes: Sequence[str]) -> bool | None:
    """Did the first probe in ``changes`` (one worker's transitions, in order) close the breaker?"""
    if "open -> half-open" not in changes:
        # Only the outcome of a probe that went out before the store was back (logged after it).
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
        if match and match["group"] == group:
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
