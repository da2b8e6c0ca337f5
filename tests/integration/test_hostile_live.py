"""The live fuzzer and the soak, in short mode (``benchmarks/fuzz_live.py --seconds 3``,
``benchmarks/soak.py --seconds 5``). Each starts its own dbus-daemon and service and
checks itself; run them by hand for longer (docs/reliability.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(90)


def run_benchmark(script: str, *args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", script), *args],
        capture_output=True,
        text=True,
        timeout=80,
        cwd=REPO,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_fuzz_live_short() -> None:
    rc, out, err = run_benchmark("fuzz_live.py", "--seconds", "3", "--seed", "20240601")
    summary = [line for line in out.splitlines() if line.startswith("fuzz_live:")]
    assert summary, f"no summary line\nstdout:\n{out}\nstderr:\n{err}"
    assert rc == 0 and summary[-1].endswith("PASS"), f"{summary[-1]}\n{err}"


def test_soak_short() -> None:
    rc, out, err = run_benchmark("soak.py", "--seconds", "5", "--seed", "20240601")
    summary = [line for line in out.splitlines() if line.startswith("soak:")]
    assert summary, f"no summary line\nstdout:\n{out}\nstderr:\n{err}"
    assert rc == 0 and summary[-1].endswith("PASS"), f"{summary[-1]}\n{err}"
    assert "lost 0, reordered 0, wrong fds 0" in summary[-1]
