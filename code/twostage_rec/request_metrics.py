"""Per-stage CloudWatch metrics without API calls: Embedded Metric Format (EMF) records on stdout.

Each model-server worker adds up what it answers over a window of at most ``METRICS_WINDOW_S``
seconds and writes the window as JSON objects, one per line, on its stdout; CloudWatch Logs
extracts the metrics from those log events. A window also closes at 100 requests: the EMF
specification allows at most 100 values in a metric's array, and every request adds one latency
value per stage. The first record of a window (dimension ``ModelVersion``):

- ``Requests`` (every invocation answered, errors included), ``UsersAnswered``, ``FallbackAnswers``
  (popular items for a user the model does not know), ``DegradedAnswers`` (features or history
  partly from the fallback), ``Errors4xx``, ``Errors5xx``: sums over the window (Count);
- ``HistoryLatency``, ``RetrievalLatency``, ``FeaturesLatency``, ``RankingLatency``,
  ``TotalLatency``: the recommender's stage timings, one value per answered request (a batch
  shares one set), as value arrays so that CloudWatch keeps every sample for its percentiles.

Then one record per Feature Store circuit breaker (dimensions ``ModelVersion``, ``Breaker``):
``BreakerOpen`` is 1 when the breaker was open or half-open after any request of the window.

Where the lines go: multi-model-server relays each line of a worker's stdout to its log4j logger
``com.amazonaws.ml.mms.wlm.WorkerLifeCycle`` at INFO; serve's log4j config
(:data:`twostage_rec.server.LOG4J2_XML`) prints the lines that start with ``{"_aws":`` as they
are, with no timestamp or level in front: CloudWatch only reads a log event that is the JSON
object alone.

When records are written: a request only adds numbers under a lock. A window that is full or over
is handed to the process's writer thread, which also closes a window whose time is up when no
request comes. multi-model-server stops a worker with SIGTERM while its own Java side shuts down,
and relays a worker's output only for a moment after; a worker (forked by multiprocessing) then
leaves with ``os._exit``, which skips atexit. So the worker's SIGTERM handler is chained: the open
window is written at once, then the previous handler runs. atexit covers processes that exit
normally.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from twostage_rec.circuit_breaker import CLOSED, CircuitBreaker
from twostage_rec.recommender import Recommendation, TwoStageRecommender
from twostage_rec.settings import Settings

logger = logging.getLogger(__name__)

STAGES: Final = ("history", "retrieval", "features", "ranking", "total")
LATENCY_METRICS: Final = {stage: f"{stage.capitalize()}Latency" for stage in STAGES}
COUNTS: Final = ("Requests", "UsersAnswered", "FallbackAnswers", "DegradedAnswers", "Errors4xx", "Errors5xx")
BREAKER_METRIC: Final = "BreakerOpen"
MODEL_VERSION: Final = "ModelVersion"  # the dimension every metric carries
BREAKER: Final = "Breaker"  # the breaker record's second dimension
MAX_VALUES: Final = 100  # the EMF specification's limit on a metric's value array
STOP_WAIT_S: Final = 1.0  # how long a flush waits for the writer thread


@dataclass
class MetricsWindow:
    """What one process answered from ``started`` (epoch seconds) until ``ends`` (its clock)."""

    started: float
    ends: float
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: {stage: [] for stage in STAGES})
    breakers_open: dict[str, int] = field(default_factory=dict)  # breaker name -> 0 or 1


def emf_records(window: MetricsWindow, namespace: str, model_version: str) -> list[dict[str, Any]]:
    """``window`` as EMF documents: the request record, then one record per circuit breaker."""
    timestamp = int(window.started * 1000)
    definitions = [{"Name": name, "Unit": "Count"} for name in COUNTS]
    members: dict[str, Any] = {MODEL_VERSION: model_version, **window.counts}
    for stage, values in window.latencies_ms.items():
        if values:  # the specification requires a member for every metric defined
            definitions.append({"Name": LATENCY_METRICS[stage], "Unit": "Milliseconds"})
            members[LATENCY_METRICS[stage]] = values
    records = [_document(timestamp, namespace, [MODEL_VERSION], definitions, members)]
    for name, is_open in window.breakers_open.items():
        members = {MODEL_VERSION: model_version, BREAKER: name, BREAKER_METRIC: is_open}
        records.append(_document(timestamp, namespace, [MODEL_VERSION, BREAKER],
                                 [{"Name": BREAKER_METRIC, "Unit": "None"}], members))
    return records


def _document(
    timestamp: int, namespace: str, dimensions: list[str], definitions: list[dict[str, str]], members: dict[str, Any]
) -> dict[str, Any]:
    # "_aws" first: serve's log4j config recognises a record by the line's first characters.
    directive = {"Namespace": namespace, "Dimensions": [dimensions], "Metrics": definitions}
    return {"_aws": {"Timestamp": timestamp, "CloudWatchMetrics": [directive]}, **members}


def write_stdout_line(line: str) -> None:
    """One line on this process's stdout, flushed (a model-server worker's stdout is a pipe)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


_WRITE: Final = object()  # writer thread: write the windows handed over, close one that is over


@dataclass(frozen=True)
class _Flush:
    """Writer thread: write every window now, the open one included, then answer on ``done``."""

    done: queue.SimpleQueue[None]
    stop: bool  # and end the thread


class RequestMetrics:
    """One process's request metrics: windows of counts and stage latencies, written as EMF lines.

    :meth:`record_answers` and :meth:`record_error` are called by the request thread; a writer
    thread (``timer=True``) serializes and writes. Without the thread, a record writes the windows
    it finds over, and a window stays open until then or a flush. State is per process: in a
    process forked after construction the first record starts afresh (a thread does not survive a
    fork). With ``hook_process_stop`` that first record also chains the process's SIGTERM handler
    and registers an atexit flush. ``clock`` (seconds, monotonic) decides when a window is over;
    ``wall_clock`` (epoch seconds) stamps it.
    """

    def __init__(
        self,
        namespace: str,
        model_version: str,
        window_s: float,
        breakers: Sequence[CircuitBreaker] = (),
        write_line: Callable[[str], None] = write_stdout_line,
        enabled: bool = True,
        timer: bool = True,
        hook_process_stop: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.namespace = namespace
        self.model_version = model_version
        self.enabled = enabled
        self._window_s = window_s
        self._breakers = list(breakers)
        self._write_line = write_line
        self._timer = timer
        self._hook_process_stop = hook_process_stop
        self._clock = clock
        self._wall_clock = wall_clock
        self._start_lock = threading.Lock()
        self._pid: int | None = None  # the process whose state below this is
        self._hooked_pid: int | None = None
        self._lock = threading.Lock()
        self._window: MetricsWindow | None = None
        self._closed: list[MetricsWindow] = []  # over, not yet written
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_worker(cls, settings: Settings, recommender: TwoStageRecommender) -> RequestMetrics:
        """A model-server worker's metrics as ``settings`` say: on stdout, written on SIGTERM and at exit."""
        return cls(settings.metrics_namespace, recommender.model_version, settings.metrics_window_s,
                   breakers=recommender.breakers, enabled=settings.metrics_enabled, hook_process_stop=True)

    def record_answers(self, answers: Sequence[Recommendation | Any]) -> None:
        """One answered request: its users, fallbacks, degraded answers and stage timings. A JSON
        Lines answer may hold lines without a recommendation (their errors): not counted as users."""
        if not self.enabled:
            return
        answers = [a for a in answers if isinstance(a, Recommendation)]
        open_now = self._open_breakers()
        timings = answers[0].timings_ms if answers else {}
        self._ensure_process()
        now = self._clock()
        with self._lock:
            window, notify = self._current(now)
            counts = window.counts
            counts["Requests"] += 1
            counts["UsersAnswered"] += len(answers)
            counts["FallbackAnswers"] += sum(a.fallback is not None for a in answers)
            counts["DegradedAnswers"] += sum(a.degraded for a in answers)
            full = False
            for stage, values in window.latencies_ms.items():
                if stage in timings:
                    values.append(timings[stage])
                    full = full or len(values) >= MAX_VALUES
            for name in open_now:
                window.breakers_open[name] = 1
            if full:
                self._closed.append(window)
                self._window, notify = None, True
        if notify:
            self._handoff()

    def record_error(self, status: int) -> None:
        """One request answered with an error status (4xx or 5xx)."""
        if not self.enabled:
            return
        open_now = self._open_breakers()
        self._ensure_process()
        now = self._clock()
        with self._lock:
            window, notify = self._current(now)
            window.counts["Requests"] += 1
            window.counts["Errors5xx" if status >= 500 else "Errors4xx"] += 1
            for name in open_now:
                window.breakers_open[name] = 1
        if notify:
            self._handoff()

    def flush(self) -> None:
        """Write every window of this process now, the open one included (waits up to STOP_WAIT_S)."""
        self._flush(stop=False)

    def close(self) -> None:
        """Flush, then stop the writer thread; a later record starts a new one."""
        self._flush(stop=True)

    def _flush(self, stop: bool) -> None:
        if self._pid != os.getpid():
            return  # nothing recorded in this process
        thread = self._thread
        if thread is not None and thread.is_alive():
            done: queue.SimpleQueue[None] = queue.SimpleQueue()
            self._inbox.put(_Flush(done, stop))
            try:
                done.get(timeout=STOP_WAIT_S)
            except queue.Empty:
                logger.warning("metrics: the writer thread did not flush within %g s", STOP_WAIT_S)
                return
            if stop:
                thread.join(STOP_WAIT_S)
        else:
            self._write(self._take(everything=True))
        if stop:
            self._pid = None  # the next record starts a new writer thread

    def _handoff(self) -> None:
        """A window closed or opened: wake the writer thread, or without one write closed windows here."""
        if self._thread is not None:
            self._inbox.put(_WRITE)
        else:
            self._write(self._take(everything=False))

    def _open_breakers(self) -> list[str]:
        return [b.name for b in self._breakers if b.state != CLOSED]

    def _current(self, now: float) -> tuple[MetricsWindow, bool]:
        """The window a record at ``now`` goes to, and whether the writer thread must hear of it
        (a window closed, or a new one opened whose end it must wait for). Under ``_lock``."""
        window = self._window
        if window is not None and now < window.ends:
            return window, False
        if window is not None:
            self._closed.append(window)
        breakers = dict.fromkeys((b.name for b in self._breakers), 0)
        window = self._window = MetricsWindow(self._wall_clock(), now + self._window_s, breakers_open=breakers)
        return window, True

    def _ensure_process(self) -> None:
        if self._pid == os.getpid():
            return
        with self._start_lock:
            pid = os.getpid()
            if self._pid == pid:
                return
            # A fork's copy of the parent's windows is the parent's to write.
            self._lock = threading.Lock()
            self._window, self._closed = None, []
            self._inbox = queue.SimpleQueue()
            self._thread = None
            if self._timer:
                self._thread = threading.Thread(target=self._run, args=(self._inbox,), name="emf-metrics", daemon=True)
                self._thread.start()
            if self._hook_process_stop and self._hooked_pid != pid:
                self._hook_stop()
                self._hooked_pid = pid
            self._pid = pid

    def _hook_stop(self) -> None:
        """Flush at exit and on SIGTERM, before the handler already installed (model server's)."""
        atexit.register(self.close)
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set a signal handler
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signo: int, frame: Any) -> None:
            self.flush()
            if callable(previous):
                previous(signo, frame)
            elif previous == signal.SIG_DFL:  # terminate as the signal would have
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_sigterm)

    def _run(self, inbox: queue.SimpleQueue[object]) -> None:
        """The writer thread: write windows as they close, on a flush, and when the open one is over."""
        while True:
            try:
                message = inbox.get(timeout=self._seconds_left())
            except queue.Empty:
                message = _WRITE
            flush = message if isinstance(message, _Flush) else None
            self._write(self._take(everything=flush is not None))
            if flush is not None:
                flush.done.put(None)
                if flush.stop:
                    return

    def _seconds_left(self) -> float | None:
        """Until the open window is over (None: no window, wait for a record to open one)."""
        with self._lock:
            window = self._window
        return None if window is None else max(0.0, window.ends - self._clock())

    def _take(self, everything: bool) -> list[MetricsWindow]:
        """The windows to write: those closed, and the open one if it is over (or ``everything``)."""
        # A bounded wait: a signal handler's flush may find its own thread holding the lock.
        if not self._lock.acquire(timeout=STOP_WAIT_S):
            return []
        try:
            window = self._window
            if window is not None and (everything or self._clock() >= window.ends):
                self._closed.append(window)
                self._window = None
            taken, self._closed = self._closed, []
        finally:
            self._lock.release()
        return taken

    def _write(self, windows: list[MetricsWindow]) -> None:
        for window in windows:
            try:
                lines = [json.dumps(r, separators=(",", ":"), allow_nan=False)
                         for r in emf_records(window, self.namespace, self.model_version)]
                for line in lines:
                    self._write_line(line)
            except Exception:  # noqa: BLE001 - metrics must never stop the writer or a request
                logger.exception("metrics: a window of %d requests could not be written",
                                 window.counts["Requests"])
