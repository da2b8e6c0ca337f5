"""tune_malloc: 1 MiB message buffers come from the heap (kept), not from fresh mmaps."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

_PROBE = """
import ctypes, sys
from xdg_containers.service.memtune import tune_malloc

def in_heap(buf: bytearray) -> bool:
    addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False

if sys.argv[1] == "tuned":
    assert tune_malloc()
print(in_heap(bytearray(1 << 20)))
"""


def _probe(mode: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_large_buffers_come_from_the_heap_once_tuned() -> None:
    assert _probe("default") == "False"  # glibc's default: a fresh mmap per 1 MiB buffer
    assert _probe("tuned") == "True"
