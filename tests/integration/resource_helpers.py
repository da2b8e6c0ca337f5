"""Tools for the SPEC 12 budget tests: a service started under a wrapper (prlimit, a fault
injector), a bystander that keeps connecting and round-tripping on another server, and the
service's CPU time, peak RSS and log volume from /proc and its log.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field

from tests.conftest import ServiceProcess, start_service
from tests.support.rawconn import RawConn, add_server

_TICKS = os.sysconf("SC_CLK_TCK")


def start_wrapped(
    bus_address: str,
    runtime_dir: str,
    extra_args: list[str] | None = None,
    *,
    prefix: list[str] | None = None,
    module: str = "xdg_containers",
) -> ServiceProcess:
    """As conftest.start_service, run as ``prefix + [python, -m, module, ...]`` (e.g.
    under ``prlimit``, or through a test-only module that injects faults)."""
    return start_service(bus_address, runtime_dir, extra_args, prefix=prefix, module=module)


def stop_wrapped(sp: ServiceProcess) -> None:
    """SIGTERM (SIGKILL if it hangs), then drop its log file."""
    sp.stop()
    os.unlink(sp.log_path)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def reset_peak_rss(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def fd_limits(pid: int) -> tuple[int, int]:
    """The soft and hard RLIMIT_NOFILE of a process, from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as fh:
        for line in fh:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def set_fd_limit(pid: int, soft: int, hard: int) -> None:
    """Change a running process's RLIMIT_NOFILE (util-linux prlimit)."""
    subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={soft}:{hard}"], check=True)


def log_lines(sp: ServiceProcess) -> list[str]:
    """The service's log so far, one entry per line."""
    return sp.log().splitlines()


@dataclass
class Bystander:
    """A well-behaved client of another server: in a thread, again and again, connects,
    authenticates, says Hello, calls GetId and disconnects, timing each whole round."""

    address: str
    interval: float = 0.05
    timeout: float = 20.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Bystander:
        """Start the rounds."""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def round(self) -> float:
        """One round; its duration in seconds."""
        t0 = time.monotonic()
        with RawConn(self.address, self.timeout) as c:
            c.setup()
            reply = c.driver("GetId")
            assert len(reply.body[0]) == 32, reply
        return time.monotonic() - t0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.latencies.append(self.round())
            except Exception as exc:
                self.errors.append(repr(exc))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        """Stop after the current round."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)

    def gets_through(self, wait: float) -> bool:
        """True if the bystander completes another round within ``wait`` seconds."""
        rounds = len(self.latencies)
        time.sleep(wait)
        return len(self.latencies) > rounds

    @property
    def worst(self) -> float:
        """The slowest round so far (seconds)."""
        return max(self.latencies, default=float("inf"))


def new_server(manager: RawConn, instance: str) -> str:
    """AddServer; the socket address."""
    return add_server(manager, instance=instance)[1]
