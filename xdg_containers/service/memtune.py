"""Keep glibc from returning freed message buffers to the kernel at once.

By default glibc serves a 1 MiB allocation with a fresh mmap (or trims the
heap after it is freed), so every large message the proxy receives costs a
page fault per 4 KiB, twice (our buffer, then the kernel's copy into it): more
than copying the bytes. Serving allocations below 4 MiB from the heap and
trimming it only above 64 MiB of free space keeps those pages for the next
message. Memory use is bounded by the biggest burst of large messages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_malloc() -> bool:
    """Apply the thresholds; False where there is no glibc ``mallopt`` (then nothing changes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt here; allocation thresholds left as they are")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
