"""D-Bus activation: the shipped .service file starts the service on first use.

The bus's service dir holds the file generated from
``data/dbus-1/services/org.freedesktop.DBus.Containers1.service.in`` with
``@bindir@`` pointing at a stand-in for the installed ``xdg-containers``: a
shell script that runs the checkout's package and records its exit status.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import NAME, REPO
from tests.integration.test_cli_common import cli, cli_env, read_text

pytestmark = pytest.mark.timeout(90)

SERVICE_IN = os.path.join(REPO, "data", "dbus-1", "services", f"{NAME}.service.in")
STAND_IN = """#!/bin/sh
# Stand-in for the installed xdg-containers: the checkout's package, its exit status recorded.
PYTHONPATH={repo}${{PYTHONPATH:+:$PYTHONPATH}}
export PYTHONPATH
{python} -m xdg_containers -v "$@" 2>>{log}
echo $? > {status}
"""


@dataclass
class ActivatableBus:
    """A private bus whose service dir can start xdg-containers."""

    bus: object
    address: str
    log: str
    status: str

    def exit_status(self, timeout: float = 15.0) -> int:
        """Wait for the activated service's recorded exit status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.status):
                text = read_text(self.status).strip()
                if text:
                    return int(text)
            time.sleep(0.05)
        raise AssertionError(f"the activated service did not exit; log:\n{self.service_log()}")

    def service_log(self) -> str:
        """What the activated service wrote to stderr."""
        return read_text(self.log) if os.path.exists(self.log) else ""


@pytest.fixture
def activatable_bus(
    runtime_dir: str, tmp_path: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ActivatableBus]:
    """A private dbus-daemon with the generated .service file; DBUS_SESSION_BUS_ADDRESS set."""
    from tests.support.bus import started_bus

    bindir = os.path.join(tmp_path, "bin")
    services = os.path.join(tmp_path, "services")
    os.makedirs(bindir)
    os.makedirs(services)
    log = os.path.join(tmp_path, "service.log")
    status = os.path.join(tmp_path, "status")
    stand_in = os.path.join(bindir, "xdg-containers")
    with open(stand_in, "w") as fh:
        fh.write(
            STAND_IN.format(
                repo=shlex.quote(REPO),
                python=shlex.quote(sys.executable),
                log=shlex.quote(log),
                status=shlex.quote(status),
            )
        )
    os.chmod(stand_in, 0o755)
    with open(SERVICE_IN) as fh:
        template = fh.read()
    assert "@bindir@/xdg-containers serve" in template
    with open(os.path.join(services, f"{NAME}.service"), "w") as fh:
        fh.write(template.replace("@bindir@", bindir))
    # The daemon's own environment has no session bus address: what the
    # service finds is what dbus-daemon gives activated services.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBUS_")}
    bus = started_bus(service_dirs=[services], env=env)
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", bus.address)
    yield ActivatableBus(bus, bus.address, log, status)
    bus.stop()


def _gdbus(
    address: str, dest: str, path: str, method: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """``gdbus call`` on ``address``."""
    return subprocess.run(
        ["gdbus", "call", "--address", address, "-d", dest, "-o", path, "-m", method, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _owner_pid(address: str) -> int | None:
    """The pid owning the service's name, if any."""
    r = _gdbus(
        address,
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus.GetConnectionUnixProcessID",
        NAME,
    )
    if r.returncode != 0:
        return None
    return int(r.stdout.strip().strip("(),").split()[-1])


def _has_owner(address: str) -> bool:
    """Whether the service's name has an owner."""
    r = _gdbus(
        address,
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus.NameHasOwner",
        NAME,
    )
    return r.stdout.strip() == "(true,)"


def _stop_activated(ab: ActivatableBus) -> int:
    """SIGTERM the activated service; its exit status."""
    pid = _owner_pid(ab.address)
    assert pid is not None, "the service does not own its name"
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        assert b"xdg_containers" in fh.read()
    os.kill(pid, signal.SIGTERM)
    return ab.exit_status()


def test_first_call_activates_the_service(activatable_bus: ActivatableBus) -> None:
    """gdbus calling the name starts the service; it exits 0 on SIGTERM."""
    ab = activatable_bus
    assert not _has_owner(ab.address)
    r = _gdbus(
        ab.address,
        NAME,
        "/org/freedesktop/DBus/Containers1",
        "org.freedesktop.DBus.Containers1.ListServers",
    )
    assert r.returncode == 0, r.stderr + ab.service_log()
    assert r.stdout.strip() in ("(@ao [],)", "([],)")
    assert _has_owner(ab.address)
    assert f"serving {NAME} on {ab.address}" in ab.service_log()
    assert _stop_activated(ab) == 0


def test_admin_commands_do_not_activate(activatable_bus: ActivatableBus) -> None:
    """list/info/identify/stop use NO_AUTO_START: nothing is started."""
    ab = activatable_bus
    for args in (("list",), ("info", "c0"), ("identify", ":1.0"), ("stop", "c0")):
        r = subprocess.run(
            [sys.executable, "-m", "xdg_containers", *args],
            capture_output=True,
            text=True,
            env=cli_env(),
            cwd=REPO,
            timeout=60,
        )
        assert r.returncode == 3, r.stderr
        assert "xdg-containers is not running on this bus" in r.stderr
    assert not _has_owner(ab.address)
    assert not os.path.exists(ab.status) and ab.service_log() == ""


async def test_run_activates_the_service(activatable_bus: ActivatableBus, tmp_path: str) -> None:
    """run starts the service when it is not running yet."""
    ab = activatable_bus
    out = os.path.join(tmp_path, "id")
    r = await cli(
        "run",
        "--type",
        "org.example.T",
        "--app-id",
        "org.example.A",
        "--",
        "sh",
        "-c",
        'gdbus call --address "$DBUS_SESSION_BUS_ADDRESS" -d org.freedesktop.DBus '
        f"-o /org/freedesktop/DBus -m org.freedesktop.DBus.GetId > {out}",
    )
    assert r.returncode == 0, r.stderr + ab.service_log()
    assert read_text(out).startswith("('")
    assert _has_owner(ab.address)
    assert "new server for org.example.T" in ab.service_log()
    assert _stop_activated(ab) == 0
