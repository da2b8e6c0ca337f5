"""The drop-in outlives its service: after a kill -9 it registers again, or serves in-process
meanwhile, and its sockets never go away (issue 19, docs/flatpak.md "Service restarts").

Each drop-in runs in a mount namespace whose root carries a /.flatpak-info (as in
flatpak's proxy sandbox), so each has an app id of its own; its clients are dbus-send
and dbus-test-tool, through its sockets; the service answers for them on the real bus.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import NAME, ServiceProcess
from tests.integration.test_activation import ActivatableBus, activatable_bus  # noqa: F401
from tests.support.bus import PrivateBus
from tests.support.dropin import dropin_programs
from xdg_containers.anchor.sandbox import host_readonly_args

pytestmark = pytest.mark.timeout(90)

HIDDEN = "org.example.Hidden"
C1 = "org.freedesktop.DBus.Containers1"


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Both forms of the drop-in (the Python script, the C front)."""
    return dropin_programs(str(tmp_path_factory.mktemp("dropin-restart")))


@pytest.fixture(params=["python", "front"])
def form(request: pytest.FixtureRequest) -> str:
    """Which form of the drop-in runs."""
    return str(request.param)


def _wait(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


@dataclass
class DropIn:
    """One running drop-in: its process, sync pipe's read end, stderr file, sockets."""

    proc: subprocess.Popen[bytes]
    sync_r: int
    err_path: str
    paths: list[str]
    app_id: str
    closers: list[Any] = field(default_factory=list)

    def stderr(self) -> str:
        """What it said so far."""
        with open(self.err_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def wait_said(self, text: str, timeout: float = 30.0) -> None:
        """Until ``text`` is on its stderr."""
        try:
            _wait(repr(text), lambda: text in self.stderr(), timeout)
        except AssertionError:
            raise AssertionError(f"{text!r} not said; stderr:\n{self.stderr()}") from None

    def cmdline(self) -> bytes:
        """The drop-in's own command line (bwrap's child, or grandchild)."""
        pid = self.proc.pid
        for _ in range(3):
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                line = fh.read()
            if not line.startswith(b"/usr/bin/bwrap\0") and b"/bwrap\0" not in line[:64]:
                return line
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                kids = fh.read().split()
            if not kids:
                return line
            pid = int(kids[0])
        return line

    def alive(self) -> bool:
        """Running, and every socket path still there."""
        return self.proc.poll() is None and all(os.path.exists(p) for p in self.paths)

    def close(self) -> None:
        """Close the sync pipe (flatpak's app exited): it exits 0."""
        os.close(self.sync_r)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for closer in self.closers:
            closer()


def start_dropin(program: str, tmp: str, app_id: str, groups: list[list[str]],
                 bus_address: str) -> DropIn:
    """``program`` in a mount namespace with app ``app_id``'s /.flatpak-info (host read-only,
    ``tmp`` writable), the sync byte read."""
    bwrap = shutil.which("bwrap")
    assert bwrap is not None, "bubblewrap is installed by tools/bootstrap"
    info = f"[Application]\nname={app_id}\n\n[Instance]\ninstance-id=7\n".encode()
    info_r, info_w = os.pipe()
    os.write(info_w, info)
    os.close(info_w)
    sync_r, sync_w = os.pipe()
    args: list[str] = []
    paths: list[str] = []
    for group in groups:
        args += group
        paths.append(group[1])
    err_path = os.path.join(tmp, f"{app_id}.stderr")
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus_address)
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [bwrap, *host_readonly_args(), "--bind", tmp, tmp,
             "--ro-bind-data", str(info_r), "/.flatpak-info", "--",
             program, f"--fd={sync_w}", *args],
            pass_fds=[info_r, sync_w], env=env, stdout=subprocess.DEVNULL, stderr=err,
        )
    os.close(info_r)
    os.close(sync_w)
    dropin = DropIn(proc, sync_r, err_path, paths, app_id)
    assert os.read(sync_r, 1) == b"x", dropin.stderr()
    return dropin


def send(path: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """dbus-send through the socket at ``path``."""
    return subprocess.run(["dbus-send", f"--bus=unix:path={path}", "--print-reply", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def has_owner(path: str, name: str) -> bool:
    """NameHasOwner(name) asked through ``path``."""
    done = send(path, "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                "org.freedesktop.DBus.NameHasOwner", f"string:{name}")
    assert done.returncode == 0, done.stderr
    return "boolean true" in done.stdout


def list_names_works(path: str) -> None:
    """A new client through ``path``: Hello and ListNames answered."""
    done = send(path, "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                "org.freedesktop.DBus.ListNames")
    assert done.returncode == 0, done.stderr
    assert "array [" in done.stdout


def echo(path: str, name: str) -> subprocess.Popen[bytes]:
    """A long-lived client through ``path`` owning ``name`` (dbus-test-tool), once it owns it."""
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=f"unix:path={path}")
    return subprocess.Popen(["dbus-test-tool", "echo", "--session", f"--name={name}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def owned(bus_address: str, name: str) -> bool:
    """Whether ``name`` has an owner on the real bus."""
    done = subprocess.run(
        ["dbus-send", f"--bus={bus_address}", "--print-reply", "--dest=org.freedesktop.DBus",
         "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner", f"string:{name}"],
        capture_output=True, text=True, timeout=30, check=False)
    return "boolean true" in done.stdout


def connection_info(bus_address: str, name: str) -> str:
    """GetConnectionInfo(name) on the service (no activation), as gdbus prints it."""
    done = subprocess.run(
        ["dbus-send", f"--bus={bus_address}", "--print-reply", f"--dest={C1}",
         "/org/freedesktop/DBus/Containers1", f"{C1}.GetConnectionInfo", f"string:{name}"],
        capture_output=True, text=True, timeout=30, check=False)
    return done.stdout + done.stderr


def call_echo(bus_address: str, name: str) -> bool:
    """A call from the real bus to ``name`` is answered."""
    done = subprocess.run(
        ["dbus-send", f"--bus={bus_address}", "--print-reply", f"--dest={name}", "/",
         "org.example.Echo.Ping"], capture_output=True, text=True, timeout=30, check=False)
    return done.returncode == 0


def service_pid(bus_address: str) -> int | None:
    """The pid owning the service's name."""
    done = subprocess.run(
        ["dbus-send", f"--bus={bus_address}", "--print-reply", "--dest=org.freedesktop.DBus",
         "/org/freedesktop/DBus", "org.freedesktop.DBus.GetConnectionUnixProcessID",
         f"string:{NAME}"], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        return None
    return int(done.stdout.split()[-1])


@pytest.fixture
def hidden(bus_address: str) -> Iterator[None]:
    """A name on the real bus that a filtered group does not see."""
    proc = subprocess.Popen(["dbus-test-tool", "echo", f"--name={HIDDEN}"],
                            env=dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus_address),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait("the hidden name is owned", lambda: owned(bus_address, HIDDEN))
    yield
    proc.terminate()
    proc.wait()


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        p.terminate()
        p.wait()


def _registered(bus_address: str, path: str, name: str, app_id: str) -> None:
    """A new client through ``path`` owning ``name``; the service names ``app_id`` for it."""
    client = echo(path, name)
    try:
        _wait(f"{name} owned", lambda: owned(bus_address, name))
        info = connection_info(bus_address, name)
        assert f'string "{app_id}"' in info, info
    finally:
        _stop(client)


def _start_pair(program: str, tmp: str, address: str) -> tuple[DropIn, DropIn]:
    first = start_dropin(program, tmp, "org.example.First", [
        [address, os.path.join(tmp, "first-f"), "--filter", "--own=org.example.First.*"],
        [address, os.path.join(tmp, "first-u")],
    ], address)
    second = start_dropin(program, tmp, "org.example.Second", [
        [address, os.path.join(tmp, "second")],
    ], address)
    return first, second


@pytest.fixture
def bus_address(request: pytest.FixtureRequest) -> str:
    """The bus of whichever bus fixture the test uses."""
    if "activatable_bus" in request.fixturenames:
        ab: ActivatableBus = request.getfixturevalue("activatable_bus")
        return ab.address
    pb: PrivateBus = request.getfixturevalue("bus")
    return pb.address


def test_kill_9_activates_and_registers_again(
    activatable_bus: ActivatableBus, bus_address: str, hidden: None,  # noqa: F811
    programs: dict[str, str], form: str, tmp_path: Any,
) -> None:
    """kill -9 of an activated service: new clients of both drop-ins work at once (the
    filtered group still hides what it hid), each drop-in registers again with the
    service the next call activates, and the service names their apps; both drop-ins
    and their sockets stay."""
    ab, tmp = activatable_bus, str(tmp_path)
    first, second = _start_pair(programs[form], tmp, ab.address)
    try:
        ffilt, funfilt = first.paths
        _registered(ab.address, ffilt, "org.example.First.Before", "org.example.First")
        _registered(ab.address, second.paths[0], "org.example.Second.Before",
                    "org.example.Second")
        old = service_pid(ab.address)
        assert old is not None
        os.kill(old, signal.SIGKILL)
        # New clients at once: served whoever serves them.
        list_names_works(ffilt)
        assert not has_owner(ffilt, HIDDEN)
        assert has_owner(funfilt, HIDDEN)
        list_names_works(second.paths[0])
        for d in (first, second):
            d.wait_said("registered again with the xdg-containers service")
        new = service_pid(ab.address)
        assert new is not None and new != old
        _registered(ab.address, ffilt, "org.example.First.After", "org.example.First")
        assert not has_owner(ffilt, HIDDEN)
        _registered(ab.address, second.paths[0], "org.example.Second.After",
                    "org.example.Second")
        assert first.alive() and second.alive()
        if form == "front":  # the anchor loop took the process back
            _wait("the front's anchor loop again", lambda: all(
                b"--anchor-loop" in d.cmdline() for d in (first, second)))
    finally:
        first.close()
        second.close()
    assert first.proc.returncode == 0 and second.proc.returncode == 0
    assert not any(os.path.exists(p) for p in first.paths + second.paths)


def test_not_activatable_serves_in_process_then_hands_back(
    bus: PrivateBus, bus_address: str, hidden: None, service_factory: Any,
    programs: dict[str, str], form: str, tmp_path: Any,
) -> None:
    """kill -9 of a service nobody can activate: after the grace the drop-ins serve their
    groups themselves (filtered as before); a service started by hand gets them back
    (new clients are its), and a client accepted in-process meanwhile keeps working."""
    tmp = str(tmp_path)
    sp: ServiceProcess = service_factory()
    first, second = _start_pair(programs[form], tmp, bus.address)
    client: subprocess.Popen[bytes] | None = None
    try:
        ffilt = first.paths[0]
        _registered(bus.address, ffilt, "org.example.First.Before", "org.example.First")
        _registered(bus.address, second.paths[0], "org.example.Second.Before",
                    "org.example.Second")
        sp.process.kill()
        sp.process.wait()
        for d in (first, second):
            d.wait_said("serving in this process meanwhile")
        list_names_works(ffilt)
        assert not has_owner(ffilt, HIDDEN)
        client = echo(ffilt, "org.example.First.Meanwhile")
        _wait("the in-process client's name", lambda: owned(bus.address,
                                                            "org.example.First.Meanwhile"))
        assert call_echo(bus.address, "org.example.First.Meanwhile")
        service_factory()
        for d in (first, second):
            d.wait_said("registered again with the xdg-containers service")
        _registered(bus.address, ffilt, "org.example.First.After", "org.example.First")
        assert not has_owner(ffilt, HIDDEN)
        _registered(bus.address, second.paths[0], "org.example.Second.After",
                    "org.example.Second")
        assert call_echo(bus.address, "org.example.First.Meanwhile")
        assert client.poll() is None
        assert first.alive() and second.alive()
        _stop(client)
        client = None
        if form == "front":  # nothing served in-process any more: the anchor loop again
            _wait("the front's anchor loop again", lambda: all(
                b"--anchor-loop" in d.cmdline() for d in (first, second)))
    finally:
        if client is not None:
            _stop(client)
        first.close()
        second.close()
    assert first.proc.returncode == 0 and second.proc.returncode == 0


def _server_path(bus_address: str, path: str, name: str) -> str:
    """The object path of the server behind ``path`` (GetConnectionInfo of a client)."""
    client = echo(path, name)
    try:
        _wait(f"{name} owned", lambda: owned(bus_address, name))
        info = connection_info(bus_address, name)
    finally:
        _stop(client)
    return info.split('object path "', 1)[1].split('"', 1)[0]


def test_a_server_the_service_stops_ends(
    bus: PrivateBus, service: ServiceProcess, programs: dict[str, str], form: str,
    tmp_path: Any,
) -> None:
    """The service, still running, stops one of the drop-in's servers (Server.Stop): that
    group ends as before (its socket refuses), it is not registered again, and the other
    group carries on with the service."""
    tmp = str(tmp_path)
    first, second = _start_pair(programs[form], tmp, bus.address)
    try:
        ffilt, funfilt = first.paths
        server = _server_path(bus.address, ffilt, "org.example.First.Before")
        done = subprocess.run(
            ["dbus-send", f"--bus={bus.address}", "--print-reply", f"--dest={C1}", server,
             f"{C1}.Server.Stop"], capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        first.wait_said(f"the service stopped the server of {ffilt}; it ends")

        def refused() -> bool:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(ffilt)
                except ConnectionRefusedError:
                    return True
            return False

        _wait("the stopped group's socket refuses", refused)
        _registered(bus.address, funfilt, "org.example.First.Other", "org.example.First")
        assert "registered again" not in first.stderr()
        assert first.proc.poll() is None and os.path.exists(funfilt)
        if form == "front":
            _wait("the front's anchor loop again", lambda: b"--anchor-loop" in first.cmdline())
    finally:
        first.close()
        second.close()
    assert first.proc.returncode == 0
