"""A real ``systemd --user`` for a test, fenced off from the machine (root only).

Without systemd as PID 1, a user manager started in the root cgroup takes itself for
the machine's manager and moves every process of the machine into its ``init.scope``.
Fenced: it starts in a cgroup of its own (``/xdgc-test-<random>`` in the name=systemd
and cgroup2 hierarchies), so it manages only what it starts there, and in a private
mount namespace where ``/run`` is an empty tmpfs holding ``/run/systemd/system`` (its
check that systemd booted the machine). Its units come from one directory only
(``SYSTEMD_UNIT_PATH``). ``stop()`` kills it and what it started, and removes its
cgroups.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time

#: Moves itself into the fence's cgroups, then runs the manager in a mount namespace.
LAUNCH = r"""
set -e
cg="$1"; shift
for m in $(awk '$3 == "cgroup2" || ($3 == "cgroup" && $4 ~ /name=systemd/) {print $2}' \
           /proc/self/mounts); do
    mkdir -p "$m/$cg"
    echo $$ > "$m/$cg/cgroup.procs"
done
exec unshare --mount --propagation private /bin/sh -ec \
    'mount -t tmpfs -o mode=0755 tmpfs /run; mkdir -p /run/systemd/system; exec "$@"' sh "$@"
"""


def cgroup_mounts() -> list[str]:
    """Every cgroup (v1 or v2) mount point."""
    with open("/proc/self/mounts") as fh:
        return [f[1] for f in (line.split() for line in fh) if f[2] in ("cgroup", "cgroup2")]


def usable() -> str | None:
    """Why a fenced manager cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "not root (cgroups and mount namespaces)"
    for tool in ("unshare", "awk"):
        if shutil.which(tool) is None:
            return f"no {tool}"
    if not os.path.exists("/lib/systemd/systemd"):
        return "no /lib/systemd/systemd (apt-get install systemd)"
    if not any(os.access(m, os.W_OK) for m in cgroup_mounts()):
        return "no writable cgroup hierarchy"
    return None


class UserManager:
    """One fenced ``systemd --user`` running ``unit`` from ``units``."""

    def __init__(self, units: str, runtime_dir: str, unit: str, log: str) -> None:
        """Start it; ``unit`` is its default target (started at once)."""
        self.cgroup = f"xdgc-test-{secrets.token_hex(6)}"
        self.pid1_before = _cgroups_of(1)
        env = dict(os.environ, XDG_RUNTIME_DIR=runtime_dir, SYSTEMD_UNIT_PATH=units)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", LAUNCH, "launch", self.cgroup, "/lib/systemd/systemd",
                 "--user", f"--unit={unit}", "--log-target=console"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )

    def check_fence(self) -> None:
        """Fail loudly if the manager reached out of its cgroup (PID 1 moved)."""
        assert _cgroups_of(1) == self.pid1_before, (
            f"the user manager moved PID 1: {_cgroups_of(1)} (was {self.pid1_before})")

    def procs(self) -> list[int]:
        """Every process in the fence's cgroups (the manager and its units')."""
        found: set[int] = set()
        for mount in cgroup_mounts():
            top = os.path.join(mount, self.cgroup)
            for d, _dirs, files in os.walk(top):
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError), open(os.path.join(d, "cgroup.procs")) as fh:
                        found.update(int(p) for p in fh.read().split())
        return sorted(found)

    def stop(self) -> None:
        """SIGKILL the manager and everything it started; remove the fence's cgroups."""
        for _ in range(50):
            pids = self.procs()
            if not pids and self.proc.poll() is not None:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            time.sleep(0.05)
        self.proc.wait(timeout=10)
        for mount in cgroup_mounts():
            top = os.path.join(mount, self.cgroup)
            for d, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(d)


def _cgroups_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as fh:
        return fh.read()
