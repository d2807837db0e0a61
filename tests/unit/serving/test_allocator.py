"""The allocator setting: glibc keeps request temporaries' pages instead of faulting them in again.

Each check runs in a child process: mallopt changes the whole process, and the page-fault counts
must not depend on what other tests allocated before.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from twostage_rec.allocator import keep_heap_pages
from twostage_rec.settings import Settings, SettingsError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Five 3 MB arrays alive at once, freed together, twenty times: the shape of a batch's temporaries
# (above glibc's starting mmap threshold, below numpy's 4 MB huge-page one).
_CHILD = """
import resource, sys
import numpy as np
from twostage_rec.allocator import keep_heap_pages
kept = keep_heap_pages(int(sys.argv[1]))
def rounds(n):
    for _ in range(n):
        arrays = [np.ones(3 * 1024 * 1024 // 8) for _ in range(5)]
        del arrays
rounds(2)  # the first rounds grow the heap either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(20)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(limit_bytes: int) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(limit_bytes)], check=True, capture_output=True, text=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_nothing_is_changed_for_zero() -> None:
    assert keep_heap_pages(0) is False
    assert keep_heap_pages(-1) is False


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere the allocator is left as it is")
def test_kept_heap_pages_are_not_faulted_in_again() -> None:
    default_kept, default_faults = _faults(0)
    kept, faults = _faults(256 << 20)
    assert (default_kept, kept) == (False, True)
    # 20 rounds x 15 MB: glibc's defaults unmap or trim them every round (~3,800 faults a round);
    # with the heap kept, the pages written in the first rounds are reused.
    assert default_faults > 20_000
    assert faults < default_faults / 20


# 80 MB arrays (a 10M-row int64 column), freed and allocated again: above the largest mmap
# threshold glibc allows, so only keep_freed_memory keeps them. numpy's huge pages are off so the
# count is in 4 KB pages (a fault per 2 MB page would hide the difference).
_LARGE_CHILD = """
import resource, sys
import numpy as np
from twostage_rec.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def rounds(n):
    for _ in range(n):
        arrays = [np.ones(10_000_000) for _ in range(2)]
        del arrays
rounds(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(5)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere the allocator is left as it is")
def test_freed_large_arrays_are_kept_for_reuse() -> None:
    counts = {}
    for mode in ("default", "keep"):
        out = subprocess.run(
            [sys.executable, "-c", _LARGE_CHILD, mode],
            check=True, capture_output=True, text=True, env={**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0"},
        ).stdout.split()
        counts[mode] = (out[0] == "True", int(out[1]))
    assert counts["default"][0] is False and counts["keep"][0] is True
    # 5 rounds x 160 MB: mapped afresh every round by default (~39,000 faults a round).
    assert counts["default"][1] > 100_000
    assert counts["keep"][1] < counts["default"][1] / 20


def test_setting_from_the_environment() -> None:
    assert Settings.from_env({}).malloc_keep_mb == 256
    assert Settings.from_env({"MALLOC_KEEP_MB": "0"}).malloc_keep_mb == 0
    with pytest.raises(SettingsError, match="MALLOC_KEEP_MB"):
        Settings.from_env({"MALLOC_KEEP_MB": "4096"})
