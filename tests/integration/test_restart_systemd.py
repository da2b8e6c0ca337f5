"""The real service under a real ``systemd --user`` (fenced: tests/support/usermanager.py)
with the shipped unit's restart lines (SPEC 13).

kill -9: systemd restarts it (Restart=on-failure) and hands back the fd store; every
server comes back on the same socket (same inode), a client that connected during the
outage is served. ``systemctl --user reload`` (ExecReload=serve --replace --detach):
the reload job returns, the new process is the unit's main one, a connection opened
before the reload keeps working, and the unit stays active when the old process exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_fast.aio import MessageBus

from tests.conftest import REPO, add_server
from tests.support.bus import PrivateBus
from tests.support.rawconn import RawConn
from tests.support.usermanager import UserManager, usable

pytestmark = pytest.mark.timeout(120)

SHIPPED = Path(REPO) / "data" / "systemd" / "user" / "xdg-containers.service.in"
UNIT = """[Unit]
DefaultDependencies=no
[Service]
Type=simple
Environment=PYTHONPATH={repo}
Environment=XDG_RUNTIME_DIR={runtime}
WorkingDirectory={repo}
ExecStart={python} -m xdg_containers -v serve --address {bus}
ExecReload={python} -m xdg_containers -v serve --address {bus} --replace --detach
RestartSec=0.5
StandardOutput=append:{log}
StandardError=append:{log}
{shipped}
"""
NAME = "xdgc-restart.service"


def _systemctl(runtime_dir: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime_dir)
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    return subprocess.run(["systemctl", "--user", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def _main_pid(runtime_dir: str) -> int:
    out = _systemctl(runtime_dir, "show", "-p", "MainPID", "--value", NAME)
    return int(out.stdout.strip() or 0)


def _wait(what: str, check: Any, log: Path, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; log:\n{log.read_text()[-4000:]}")


async def test_kill_9_and_reload_under_systemd(
    bus: PrivateBus, runtime_dir: str, tmp_path: Path
) -> None:
    why = usable()
    assert why is None, f"a fenced systemd --user cannot run here: {why}"
    shipped = [line for line in SHIPPED.read_text().splitlines()
               if line.startswith(("Restart=", "FileDescriptorStoreMax=", "NotifyAccess="))]
    assert len(shipped) == 3, shipped
    reload_line = [line for line in SHIPPED.read_text().splitlines()
                   if line.startswith("ExecReload=")]
    assert reload_line == ["ExecReload=@bindir@/xdg-containers serve --replace --detach"]
    units = tmp_path / "units"
    units.mkdir()
    log = tmp_path / "service.log"
    (units / NAME).write_text(UNIT.format(
        repo=REPO, runtime=runtime_dir, python=sys.executable, bus=bus.address, log=log,
        shipped="\n".join(shipped)))
    manager = UserManager(str(units), runtime_dir, NAME, str(log))
    client = await MessageBus(bus_address=bus.address, negotiate_unix_fd=True).connect()
    try:
        first = _wait("the service", lambda: "serving" in (log.read_text() if log.exists()
                                                            else "") and _main_pid(runtime_dir),
                      log)
        manager.check_fence()
        path, res = await add_server(client, app_id="org.example.UnderSystemd")
        sock = bytes(res["SocketPath"].value).rstrip(b"\0").decode()
        inode = os.stat(sock).st_ino

        # -- crash: systemd restarts it with the fd store --------------------------
        os.kill(first, signal.SIGKILL)
        queued = RawConn(f"unix:path={sock}", timeout=30)  # waits in the kept backlog
        second = _wait("the restart", lambda: (p := _main_pid(runtime_dir)) not in (0, first)
                       and p, log)
        queued.setup()
        assert queued.driver("GetId").body
        assert os.stat(sock).st_ino == inode
        assert "brought back 1 server(s)" in log.read_text()
        with RawConn(f"unix:path={sock}", timeout=10).setup() as fresh:
            assert fresh.unique_name

        # -- reload: serve --replace --detach ---------------------------------------
        done = _systemctl(runtime_dir, "reload", NAME)
        assert done.returncode == 0, done.stderr + log.read_text()[-4000:]
        third = _wait("the new main process",
                      lambda: (p := _main_pid(runtime_dir)) not in (0, second) and p, log)
        assert queued.driver("GetId").body, "a connection of the old process keeps working"
        queued.close()  # the old process's last connection: it exits 0
        _wait("the old process to exit", lambda: not os.path.exists(f"/proc/{second}"), log)
        time.sleep(1.0)  # RestartSec=0.5: a unit that ended would be restarting now
        state = _systemctl(runtime_dir, "is-active", NAME).stdout.strip()
        assert state == "active" and _main_pid(runtime_dir) == third, log.read_text()[-4000:]
        with RawConn(f"unix:path={sock}", timeout=10).setup() as fresh:
            assert fresh.driver("GetId").body
        assert os.stat(sock).st_ino == inode
        manager.check_fence()
        del path
    finally:
        client.disconnect()
        manager.stop()
