"""Unmodified flatpak 1.14 runs on the drop-in proxy (SPEC 11, issue 15).

The same app runs under xdg-dbus-proxy and under ``xdg-containers-dbus-proxy``
(``FLATPAK_DBUSPROXY``), service-backed and in-process; a table of calls made
from inside the app, and calls from the host to it, must come out the same.
The bus must see the proxy process as the app (its pid's root carries the
app's ``/.flatpak-info``), as xdg-desktop-portal relies on.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import ServiceProcess
from tests.integration.flatpak_rig import APP, FlatpakRig, build_rig
from tests.support.bus import PrivateBus
from tests.support.packages import ensure_packages

pytestmark = pytest.mark.timeout(120)

#: Run inside the app: one line per probe, ``LABEL ok``, ``LABEL ERROR-NAME`` or a value.
APP_SCRIPT = r"""
t() { label=$1; shift
  if out=$(dbus-send --session --print-reply "$@" 2>&1); then
    echo "$label ok $(printf '%s\n' "$out" | sed -n '2,$p' | tr -s ' \n' ' ' | sed 's/ *$//')"
  else echo "$label $(printf '%s' "$out" | sed -n '1s/^Error \([^:]*\).*/\1/p')"; fi; }
D="--dest=org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus"
t talk --dest=org.example.Talk /x org.example.I.M
t see --dest=org.example.See /x org.example.I.M
t hidden --dest=org.example.Hidden /x org.example.I.M
t portal_rule --dest=org.freedesktop.portal.Test /org/freedesktop/portal/x org.example.I.M
t own_app_sub $D.RequestName string:org.example.App.Sub uint32:4
t own_listed $D.RequestName string:org.example.Own uint32:4
t own_talk_only $D.RequestName string:org.example.Talk uint32:4
t own_hidden $D.RequestName string:org.example.Nope uint32:4
t has_see $D.NameHasOwner string:org.example.See
t has_talk $D.NameHasOwner string:org.example.Talk
t has_hidden $D.NameHasOwner string:org.example.Hidden
t owner_hidden $D.GetNameOwner string:org.example.Hidden
M=org.freedesktop.DBus.Monitoring
t monitor --dest=org.freedesktop.DBus /org/freedesktop/DBus $M.BecomeMonitor array:string: uint32:0
t update_env $D.UpdateActivationEnvironment dict:string:string:A,B
names=$(dbus-send --session --print-reply $D.ListNames)
wk=$(printf '%s\n' "$names" | sed -n 's/^ *string "\([^:][^"]*\)"$/\1/p' | sort)
echo "names $(printf '%s\n' "$wk" | tr '\n' ' ')"
dbus-test-tool echo --name=org.example.App.Echo &
echo READY
read -r _line
kill $! 2>/dev/null
echo DONE
"""

#: What xdg-dbus-proxy answers (checked too, so that equal-but-wrong cannot pass).
EXPECTED = {
    "talk": "ok",
    "see": "org.freedesktop.DBus.Error.AccessDenied",
    "hidden": "org.freedesktop.DBus.Error.ServiceUnknown",
    "portal_rule": "ok",
    "own_app_sub": "ok uint32 1",
    "own_listed": "ok uint32 1",
    "has_see": "ok boolean true",
    "has_talk": "ok boolean true",
    "has_hidden": "ok boolean false",
    "monitor": "org.freedesktop.DBus.Error.AccessDenied",
}
HOST_NAMES = ("org.example.Talk", "org.example.See", "org.example.Hidden",
              "org.freedesktop.portal.Test")


@pytest.fixture(scope="session")
def rig() -> Iterator[FlatpakRig]:
    """flatpak, a runtime made of host binaries and org.example.App, built once."""
    root = tempfile.mkdtemp(prefix="xdgc-flatpak-")
    try:
        yield build_rig(root)
    finally:
        subprocess.run(["rm", "-rf", root], check=False)


@pytest.fixture
def host_peers(bus: PrivateBus) -> Iterator[None]:
    """Echo services on the host side of the bus, one per policy level."""
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus.address)
    procs = [
        subprocess.Popen(["dbus-test-tool", "echo", f"--name={name}"], env=env,
                         stderr=subprocess.DEVNULL)
        for name in HOST_NAMES
    ]
    try:
        for name in HOST_NAMES:
            _wait_owner(bus.address, name)
        yield
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def _host(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dbus-send", f"--bus={address}", "--print-reply", *args],
                          capture_output=True, text=True, timeout=20, check=False)


def _owner(address: str, name: str) -> str | None:
    r = _host(address, "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
              "org.freedesktop.DBus.GetNameOwner", f"string:{name}")
    m = re.search(r'string "([^"]+)"', r.stdout)
    return m.group(1) if r.returncode == 0 and m else None


def _wait_owner(address: str, name: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owner = _owner(address, name)
        if owner:
            return owner
        time.sleep(0.05)
    raise AssertionError(f"{name} has no owner after {timeout}s")


@dataclass
class AppRun:
    """What one run of the app showed."""

    table: dict[str, str]
    proxy_pid: int
    proxy_cmdline: str
    proxy_info: str
    connection_info: str
    host_to_app: str
    host_to_app_unique: str
    proxy_exited: bool
    sockets_left: list[str]
    stderr: str


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def run_app(
    rig: FlatpakRig, bus: PrivateBus, runtime_dir: str, proxy: str | None
) -> AppRun:
    """Run the app's probe script, then the host-side checks while it waits."""
    env = rig.env(bus.address, runtime_dir, proxy)
    proc = subprocess.Popen(
        ["flatpak", "run", APP, "-c", APP_SCRIPT], env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        table: dict[str, str] = {}
        while True:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"the app ended early: {table} {proc.stderr.read()}")  # type: ignore[union-attr]
            line = line.rstrip("\n")
            if line == "READY":
                break
            label, _, value = line.partition(" ")
            table[label] = " ".join(value.split())
        unique = _wait_owner(bus.address, "org.example.App.Echo")
        host_to_app = _host(bus.address, "--dest=org.example.App.Echo", "/x", "org.example.I.M")
        host_to_unique = _host(bus.address, f"--dest={unique}", "/x", "org.example.I.M")
        pid_reply = _host(bus.address, "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                          "org.freedesktop.DBus.GetConnectionUnixProcessID", f"string:{unique}")
        pid = int(pid_reply.stdout.split()[-1])
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().replace(b"\0", b" ").decode()
        with open(f"/proc/{pid}/root/.flatpak-info", encoding="utf-8") as fh:
            info = fh.read()
        conn_info = subprocess.run(
            ["gdbus", "call", "--address", bus.address, "--dest",
             "org.freedesktop.DBus.Containers1", "--object-path",
             "/org/freedesktop/DBus/Containers1", "--method",
             "org.freedesktop.DBus.Containers1.GetConnectionInfo", unique],
            capture_output=True, text=True, timeout=20, check=False,
        )
        proc.stdin.write("\n")
        proc.stdin.flush()
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 10
    while not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    proxy_dir = os.path.join(runtime_dir, ".dbus-proxy")
    left = sorted(os.listdir(proxy_dir)) if os.path.isdir(proxy_dir) else []
    return AppRun(
        table, pid, cmdline, info, conn_info.stdout + conn_info.stderr,
        "ok" if host_to_app.returncode == 0 else host_to_app.stderr,
        "ok" if host_to_unique.returncode == 0 else host_to_unique.stderr,
        _exited(pid), left, err,
    )


def _check_expected(table: dict[str, str]) -> None:
    for label, value in EXPECTED.items():
        assert table.get(label) == value, (label, table)


def _check_identity(run: AppRun, proxy_word: str) -> None:
    assert proxy_word in run.proxy_cmdline, run.proxy_cmdline
    assert f"name={APP}" in run.proxy_info
    assert run.host_to_app == "ok" and run.host_to_app_unique == "ok", run
    assert run.proxy_exited, f"the proxy (pid {run.proxy_pid}) outlived the app"
    assert run.sockets_left == [], run.sockets_left


FORMS = pytest.mark.parametrize("form", ["front", "python"])


@FORMS
def test_flatpak_same_outcomes_service_backed(
    rig: FlatpakRig, bus: PrivateBus, runtime_dir: str, host_peers: None,
    service: ServiceProcess, form: str,
) -> None:
    """Service running: the drop-in gives xdg-dbus-proxy's outcomes, the bus sees the
    drop-in's pid with the app's flatpak-info, and the service names the app."""
    reference = run_app(rig, bus, runtime_dir, None)
    _check_expected(reference.table)
    _check_identity(reference, "xdg-dbus-proxy")
    ours = run_app(rig, bus, runtime_dir, rig.dropins[form])
    assert ours.table == reference.table
    _check_identity(ours, "xdg-containers-dbus-proxy")
    assert "serving in this process" not in ours.stderr, ours.stderr
    if form == "front":  # set up, the same pid went on as the C anchor loop
        assert "--anchor-loop" in ours.proxy_cmdline, ours.proxy_cmdline
    assert "'org.flatpak'" in ours.connection_info, ours.connection_info
    assert f"'{APP}'" in ours.connection_info
    assert "org.flatpak.InfoPath" in ours.connection_info
    service.wait_for_log(f"new server for org.flatpak '{APP}'")
    service.wait_for_log("removed")


@FORMS
def test_flatpak_same_outcomes_in_process_fallback(
    rig: FlatpakRig, bus: PrivateBus, runtime_dir: str, host_peers: None, form: str
) -> None:
    """No service on the bus: the drop-in says so once and serves the same table itself."""
    reference = run_app(rig, bus, runtime_dir, None)
    ours = run_app(rig, bus, runtime_dir, rig.dropins[form])
    assert ours.table == reference.table
    _check_expected(ours.table)
    _check_identity(ours, "xdg-containers-dbus-proxy")
    assert ours.stderr.count("serving in this process") == 1, ours.stderr
    assert "NotContainer" in ours.connection_info or "ServiceUnknown" in ours.connection_info


PORTAL_SCRIPT = (
    "gdbus call --session --dest org.freedesktop.portal.Desktop --object-path "
    "/org/freedesktop/portal/desktop --method "
    "org.freedesktop.portal.NetworkMonitor.GetAvailable 2>&1; true"
)


@pytest.fixture
def real_portal(bus: PrivateBus, runtime_dir: str) -> Iterator[None]:
    """xdg-permission-store and xdg-desktop-portal 1.16 on the test's private bus."""
    ensure_packages("xdg-desktop-portal")
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus.address, XDG_RUNTIME_DIR=runtime_dir)
    procs = [
        subprocess.Popen([prog, "--replace"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
        for prog in ("/usr/libexec/xdg-permission-store", "/usr/libexec/xdg-desktop-portal")
    ]
    try:
        _wait_owner(bus.address, "org.freedesktop.portal.Desktop")
        yield
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)


@pytest.mark.parametrize("with_service", [True, False], ids=["service", "in-process"])
def test_flatpak_portal_sees_the_app(
    rig: FlatpakRig, bus: PrivateBus, runtime_dir: str, real_portal: None,
    service_factory: object, with_service: bool,
) -> None:
    """xdg-desktop-portal answers NotAllowed to the app behind the drop-in, as behind
    xdg-dbus-proxy (it reads /proc/PID/root/.flatpak-info of the drop-in's pid)."""
    if with_service:
        service_factory()  # type: ignore[operator]
    outs = []
    for proxy in (None, rig.dropins["front"]):
        done = subprocess.run(
            ["flatpak", "run", APP, "-c", PORTAL_SCRIPT],
            env=rig.env(bus.address, runtime_dir, proxy), capture_output=True, text=True,
            timeout=60, check=False,
        )
        outs.append(done.stdout)
    for out in outs:
        assert "org.freedesktop.portal.Error.NotAllowed" in out, outs
