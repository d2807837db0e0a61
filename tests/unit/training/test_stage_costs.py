"""Per-stage wall time and peak memory: the peak belongs to the stage that made it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from training import stage_costs
from training.stage_costs import StageCosts

pytestmark = pytest.mark.skipif(stage_costs._status_kb("VmRSS") is None, reason="needs /proc (Linux)")


_TWO_STAGES = """
import json
import numpy as np
from training.stage_costs import StageCosts

def touch(megabytes):
    return float(np.ones(megabytes * 1024 * 1024 // 8)[-1])  # ones: every page is written

costs = StageCosts()
with costs.stage("big"):
    touch(200)
with costs.stage("small"):
    touch(1)
print(json.dumps({"seconds": costs.seconds, "cpu_seconds": costs.cpu_seconds, "memory_mb": costs.memory_mb}))
"""


def test_each_stage_records_its_own_peak() -> None:
    # A fresh interpreter: in the suite's long-lived process, memory freed by earlier tests stays
    # resident in the allocator, a new 200 MB array reuses it and the high-water mark cannot rise.
    done = subprocess.run(
        [sys.executable, "-c", _TWO_STAGES], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    costs = json.loads(done.stdout)
    assert list(costs["seconds"]) == ["big", "small"] and all(s >= 0 for s in costs["seconds"].values())
    assert list(costs["cpu_seconds"]) == ["big", "small"] and all(s >= 0 for s in costs["cpu_seconds"].values())
    # The 200 MB array is freed before "small" starts: its peak must not carry over.
    assert costs["memory_mb"]["big"] - costs["memory_mb"]["small"] > 150


def test_the_sampler_fallback_sees_a_held_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stage_costs, "_reset_high_water", lambda: False)
    costs = StageCosts()
    with costs.stage("held"):
        block = np.ones(150 * 1024 * 1024 // 8)
        peak_inside = stage_costs._status_kb("VmRSS") / 1024
        time.sleep(5 * stage_costs._SAMPLE_S)  # the sampler sees only what lasts a sampling period
        del block
    assert costs.memory_mb["held"] >= peak_inside - 1


def test_a_failing_stage_is_still_recorded() -> None:
    costs = StageCosts()
    with pytest.raises(RuntimeError), costs.stage("broken"):
        raise RuntimeError("boom")
    assert "broken" in costs.seconds

