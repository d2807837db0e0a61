"""Recording events into the user-history group: ``python -m local_test.feature_store.events_bench``.

8 writer processes offer 1,000 events a second for 10,000 users against the local Feature Store
(its own subprocess) with the compare-and-set that ``python -m training events put`` runs, and
every event is counted back. The benchmark prints a human-readable summary, not JSON: this module
runs it as a subprocess and reads its lines (:func:`parse`), so the figures it reports are the ones
its own author checks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
SECONDS: Final = 20.0  # the benchmark's own default
_NUMBER: Final = r"[0-9.]+"
_LATENCY: Final = rf"p50 (?P<p50>{_NUMBER}) ms\s+p99 (?P<p99>{_NUMBER}) ms\s+\((?P<n>\d+) \w+\)"
# One pattern per line the figures come from; the names in each pattern are its fields.
_LINES: Final = {
    "setup": rf"endpoint \S+; (?P<writers>\d+) writer processes, (?P<users>\d+) users, (?P<offered_rate>{_NUMBER}) "
             rf"events/s offered for (?P<seconds>{_NUMBER}) s",
    "recorded": rf"recorded (?P<stored>\d+) of (?P<offered>\d+) events in (?P<elapsed_s>{_NUMBER}) s: "
                rf"(?P<achieved_rate>{_NUMBER}) events/s; (?P<puts>\d+) puts, (?P<conflicts>\d+) lost versions "
                rf"merged and retried, (?P<failed_users>\d+) users failed",
    "cpu": rf"CPU per event: (?P<writer_ms>{_NUMBER}) ms in the writers \+ (?P<server_ms>{_NUMBER}) ms in the "
           rf"server = (?P<total_ms>{_NUMBER}) ms \((?P<cores>\d+) idle cores would sustain about "
           rf"(?P<sustainable_rate>\d+) events/s\)",
    "event_latency": rf"event latency \(offer -> confirmed write\): {_LATENCY}",
    "merge_write": rf"merge-write call \(mean (?P<events_per_call>{_NUMBER}) events each\): {_LATENCY}",
    "counted": r"counted back: (?P<found>\d+) of (?P<offered>\d+); lost (?P<lost>\d+)",
    "read_1": rf"FeatureStoreHistorySource\.get, 1 user\(s\): {_LATENCY}",
    "read_100": rf"FeatureStoreHistorySource\.get, 100 user\(s\): {_LATENCY}",
}
_OPTIONAL: Final = frozenset({"cpu"})  # printed only when the benchmark started its own server


def measure(seconds: float = SECONDS) -> dict[str, Any]:
    """Run the benchmark for ``seconds`` of offered events; its figures (:func:`parse`) and exit status.

    Raises ``RuntimeError`` with the benchmark's last error line when its output cannot be read
    (a lost event is a result, exit status 1, not an error here).
    """
    command = [sys.executable, "-m", "local_test.feature_store.events_bench", "--seconds", f"{seconds:g}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "code"), str(REPO)])}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    try:
        figures = parse(result.stdout)
    except ValueError as exc:
        last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise RuntimeError(f"python -m local_test.feature_store.events_bench: {exc} ({last})") from None
    return {"command": " ".join(["python", *command[1:]]), "exit_status": result.returncode, **figures}


def parse(text: str) -> dict[str, dict[str, float]]:
    """The benchmark's figures by line (see ``_LINES``), numbers as int or float.

    Raises ``ValueError`` naming the first expected line that is missing.
    """
    out: dict[str, dict[str, float]] = {}
    for name, pattern in _LINES.items():
        match = re.search(pattern, text)
        if match is None:
            if name in _OPTIONAL:
                continue
            raise ValueError(f"no {name!r} line in its output")
        out[name] = {key: _number(value) for key, value in match.groupdict().items()}
    return out


def _number(text: str) -> float:
    return float(text) if "." in text else int(text)
