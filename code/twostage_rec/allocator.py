"""glibc's allocator, set once per worker so that request temporaries reuse warm heap pages.

By default glibc maps every allocation above its mmap threshold (128 KB, rising with use to at
most 32 MB) afresh and unmaps it on free, and returns free heap tops to the kernel: each such
array then costs one page fault per 4 KB page it writes, every request. numpy asks for huge pages
only from 4 MB on, so the arrays between (a batch's per-query-and-item sums, its feature matrix)
pay in full. On the ML-1M model a 100-user batch took ~16,000 page faults (~60 ms of its ~190 ms)
on this machine's VM; with the heap kept, ~420 (``python -m bench.allocator``).

The cost is memory: a worker keeps up to the largest request's temporaries as free heap (bounded
by ``limit_bytes`` of free top before glibc trims). ``MALLOC_KEEP_MB=0`` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Final

logger = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
M_MMAP_MAX: Final = -4
_INT_MAX: Final = 2**31 - 1  # mallopt's values are C ints
# glibc refuses an mmap threshold above DEFAULT_MMAP_THRESHOLD_MAX (32 MB on 64-bit): larger
# arrays are mapped anyway, and numpy asks for huge pages for them.
MAX_MMAP_THRESHOLD: Final = 32 * 1024 * 1024


def keep_heap_pages(limit_bytes: int) -> bool:
    """Serve allocations below ``min(limit_bytes, 32 MB)`` from the heap and keep up to
    ``limit_bytes`` of free heap instead of returning it; True when glibc accepted both.

    False without glibc (macOS, musl) or with ``limit_bytes`` <= 0: the allocator is left as it is.
    """
    mallopt = _mallopt() if limit_bytes > 0 else None
    if mallopt is None:
        return False
    threshold = min(limit_bytes, MAX_MMAP_THRESHOLD)
    accepted = mallopt(M_MMAP_THRESHOLD, threshold) == 1 and mallopt(M_TRIM_THRESHOLD, limit_bytes) == 1
    if accepted:
        logger.info("allocator: heap below %d MB, up to %d MB free heap kept", threshold >> 20, limit_bytes >> 20)
    else:
        logger.warning("allocator: glibc refused mallopt(%d, %d); its defaults stay", M_MMAP_THRESHOLD, threshold)
    return accepted


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and keep what is freed there (up to 2 GB of free top),
    for a batch job whose large arrays come and go; True when glibc accepted it.

    Above 32 MB glibc maps each allocation afresh, whatever the threshold: a training run's
    10M-row arrays (80 MB each) paid one page fault per 4 KB page at every step, 1M-row ones reused
    the heap, so the cost per row grew with the data. The resident size then stays at the peak
    instead of shrinking after it; the peak itself is the same (docs/training.md, "What it costs").
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    accepted = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
    if accepted:
        logger.info("allocator: every allocation from the heap, freed memory kept for reuse")
    else:
        logger.warning("allocator: glibc refused to keep freed memory; its defaults stay")
    return accepted


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt`` (returns 1 on success, 0 when it rejects the value); None elsewhere."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): no mallopt to call
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt
