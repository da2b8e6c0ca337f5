"""Processes read from /proc: a service's children, its memory and fds, and polling."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from the parent links in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # gone before the open (ENOENT) or between open and read (ESRCH)
        return False


def proc_field(path: str, key: str) -> int:
    """The number on the ``key:`` line of a /proc file."""
    with open(path, encoding="ascii", errors="replace") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key}: in {path}")


def status_kib(pid: int, key: str) -> int:
    """A ``VmXxx:`` line of /proc/PID/status, KiB (VmRSS, VmHWM: the peak RSS)."""
    return proc_field(f"/proc/{pid}/status", key)


def fdinfo_pid(fd: int) -> int:
    """``Pid:`` of one of our pidfds (-1 once the process is gone)."""
    return proc_field(f"/proc/self/fdinfo/{fd}", "Pid")


def rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB."""
    return status_kib(pid, "VmRSS")


def fd_count(pid: int) -> int:
    """Open fds of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def stable_fd_count(pid: int, timeout: float = 5.0) -> int:
    """Open fds of a process once two readings 50 ms apart agree."""
    deadline = time.monotonic() + timeout
    last = fd_count(pid)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = fd_count(pid)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the fd count of {pid} did not settle")


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``predicate`` until true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 5.0) -> None:
    """SIGTERM every process still running (last started first), then reap each, with
    SIGKILL for one that outlives ``timeout``."""
    for p in reversed(procs):
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def close_all(fds: Iterable[int]) -> None:
    """Close every fd, ignoring those already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def fd_is_open(fd: int) -> bool:
    """True if ``fd`` is an open file descriptor of ours."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
