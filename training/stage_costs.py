"""Wall time, CPU time and peak memory of each named stage of a training run (metrics.json's
``timings_s``, ``cpu_s`` and ``memory_mb``).

CPU time (user + system, every thread of the process) is what to compare across runs on a shared
machine: other processes on the cores stretch the wall time of the same work, not its CPU time.

Peak memory is the process's resident-set high-water mark during the stage. On Linux the kernel
keeps that mark (``VmHWM``) and lets a process reset it (writing ``5`` to ``/proc/self/clear_refs``),
so a stage's peak costs two file operations and no sampling thread. Where the reset is refused, a
thread samples ``VmRSS`` every ``_SAMPLE_S`` instead (it can miss a peak shorter than that); without
``/proc`` (macOS) memory is not recorded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_HIGH_WATER = "5"  # see proc(5), /proc/pid/clear_refs
_SAMPLE_S = 0.05


def _status_kb(field_name: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmHWM``, ``VmRSS``), None without /proc."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return None


def _reset_high_water() -> bool:
    try:
        _CLEAR_REFS.write_text(_RESET_HIGH_WATER)
    except OSError:
        return False
    return True


class _RssSampler:
    """The fallback: the largest ``VmRSS`` seen by a background thread while it runs."""

    def __init__(self) -> None:
        self.peak_kb = _status_kb("VmRSS") or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_SAMPLE_S):
            self.peak_kb = max(self.peak_kb, _status_kb("VmRSS") or 0)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak_kb, _status_kb("VmRSS") or 0)


@dataclass
class StageCosts:
    """Wall seconds, CPU seconds and peak resident memory (MB) per stage, in the order the stages ran."""

    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    memory_mb: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Record ``name``'s wall-clock and CPU seconds and its peak RSS (when measurable)."""
        logger.info("stage %s ...", name)
        reset = _reset_high_water()
        sampler = None if reset or _status_kb("VmRSS") is None else _RssSampler()
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 2)
            self.cpu_seconds[name] = round(time.process_time() - cpu_start, 2)
            peak_kb = sampler.stop() if sampler is not None else (_status_kb("VmHWM") if reset else None)
            if peak_kb is not None:
                self.memory_mb[name] = round(peak_kb / 1024, 1)
