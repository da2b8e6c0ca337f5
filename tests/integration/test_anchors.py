"""Anchors (SPEC 10): the bus sees each proxied app as its instance, never as the service.

Every check asks the real dbus-daemon who a proxied connection is
(``GetConnectionUnixProcessID`` / ``GetConnectionCredentials``) and then looks
at that process the way xdg-desktop-portal does: ``/proc/PID/root/.flatpak-info``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from tests.conftest import ServiceProcess, add_server, connect, ok
from tests.integration.helpers_c1 import driver_call, wait_disconnected
from tests.support.bus import PrivateBus
from tests.support.processes import alive
from xdg_containers.anchor.sandbox import PROGRAM

pytestmark = pytest.mark.timeout(60)

CONNECTOR = "org.freedesktop.XdgContainers1.Connector"
NO_STOP = {"StopOnDisconnect": Variant("b", False)}


def identity_of(pid: int, name: str) -> str:
    """The identity file as a portal reads it: through /proc/PID/root."""
    with open(f"/proc/{pid}/root/{name}", encoding="utf-8") as fh:
        return fh.read()


async def bus_pid(manager: MessageBus, name: str) -> int:
    """What the bus says about ``name``'s process (what every pid-based consumer uses)."""
    pid = int(ok(await driver_call(manager, "GetConnectionUnixProcessID", "s", [name]))[0])
    creds = ok(await driver_call(manager, "GetConnectionCredentials", "s", [name]))[0]
    assert int(creds["ProcessID"].value) == pid
    return pid


async def round_trip(conn: MessageBus) -> float:
    """One call to the bus through the proxy; its duration."""
    t0 = time.monotonic()
    ok(await asyncio.wait_for(driver_call(conn, "GetId"), 10))
    return time.monotonic() - t0


async def test_service_started_anchor_names_the_app(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    """(a) No Connector: the bus pid is a live process that is neither the service nor the
    client, in a mount namespace of its own, whose root carries the app's /.flatpak-info."""
    _path, results = await add_server(
        manager_bus, "org.flatpak", "org.example.Anchored", "inst-7", named=NO_STOP
    )
    address = results["Address"].value
    seen: set[int] = set()
    for _ in range(4):  # the first connection, then spare ones: all made by the anchor
        client = await connect(address)
        try:
            pid = await bus_pid(manager_bus, client.unique_name)
        finally:
            client.disconnect()
        seen.add(pid)
        assert pid not in (service.process.pid, os.getpid())
        assert os.path.exists(f"/proc/{pid}")
        info = identity_of(pid, ".flatpak-info")
        assert "[Application]\nname=org.example.Anchored\n" in info
        assert "[Instance]\ninstance-id=inst-7\n" in info
        assert not os.path.exists(f"/proc/{pid}/root/.xdg-containers-info")
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        await asyncio.sleep(0.05)
    assert len(seen) == 1, f"one anchor per server, saw {seen}"


async def test_other_container_types_get_their_own_identity_file(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    """A non-flatpak type: /.xdg-containers-info with the triple, no /.flatpak-info; two
    servers get two anchors; app ids cannot inject keys into the identity file."""
    _p1, r1 = await add_server(manager_bus, "io.example.Box", "one\n[Context]\nshared=network",
                               "i1", named=NO_STOP)
    _p2, r2 = await add_server(manager_bus, "io.example.Box", "two", "i2", named=NO_STOP)
    c1 = await connect(r1["Address"].value)
    c2 = await connect(r2["Address"].value)
    try:
        pid1 = await bus_pid(manager_bus, c1.unique_name)
        pid2 = await bus_pid(manager_bus, c2.unique_name)
        assert pid1 != pid2
        info1 = identity_of(pid1, ".xdg-containers-info")
        assert "type=io.example.Box\n" in info1 and "instance-id=i1\n" in info1
        assert "app-id=one\\n[Context]\\nshared=network\n" in info1
        assert "\n[Context]" not in info1
        assert "app-id=two\n" in identity_of(pid2, ".xdg-containers-info")
        assert not os.path.exists(f"/proc/{pid1}/root/.flatpak-info")
    finally:
        c1.disconnect()
        c2.disconnect()


async def test_anchor_ends_with_its_server(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    """The service's anchor lives exactly as long as its server and is reaped."""
    path, results = await add_server(manager_bus, "org.flatpak", "org.example.Short", "s",
                                     named=NO_STOP)
    client = await connect(results["Address"].value)
    pid = await bus_pid(manager_bus, client.unique_name)
    client.disconnect()
    ok(await manager_bus.call(_stop_message(path)))  # type: ignore[arg-type]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and alive(pid):
        await asyncio.sleep(0.05)
    assert not alive(pid), f"anchor {pid} outlived its server"


def _stop_message(path: str) -> object:
    from dbus_fast import Message

    return Message(destination="org.freedesktop.DBus.Containers1",
                   path="/org/freedesktop/DBus/Containers1",
                   interface="org.freedesktop.DBus.Containers1", member="StopServer",
                   signature="o", body=[path])




# -- launcher-provided anchors (Connector) -------------------------------------------------


class LauncherAnchor:
    """``program.py serve`` as a separate process: the launcher's side of a Connector."""

    def __init__(self) -> None:
        """Start the anchor; ``fd`` is the service's end, to pass as Connector."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", PROGRAM, "serve", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        self.sock = ours

    def close(self) -> None:
        """Kill the anchor and close our end."""
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


async def test_connector_anchor_is_what_the_bus_sees(
    service: ServiceProcess, manager_bus: MessageBus, observer: object
) -> None:
    """(b) A launcher's anchor as Connector: the bus pid is the anchor's; kill it and the
    client is closed within 2 s, ServerRemoved follows; another server carries on."""
    anchor = LauncherAnchor()
    try:
        path, results = await add_server(
            manager_bus, "org.flatpak", "org.example.Launched", "l1",
            named={**NO_STOP, CONNECTOR: Variant("h", 0)},
            unix_fds=[anchor.sock.fileno()],
        )
        anchor.sock.close()
        _bpath, bresults = await add_server(manager_bus, named=NO_STOP)
        bystander = await connect(bresults["Address"].value)
        client = await connect(results["Address"].value)
        assert await bus_pid(manager_bus, client.unique_name) == anchor.proc.pid
        # the spare connections are the anchor's too
        second = await connect(results["Address"].value)
        assert await bus_pid(manager_bus, second.unique_name) == anchor.proc.pid
        second.disconnect()
        t0 = time.monotonic()
        os.kill(anchor.proc.pid, signal.SIGKILL)
        await wait_disconnected(client, timeout=2.0)
        assert time.monotonic() - t0 < 2.0
        await observer.wait_removed(path)  # type: ignore[attr-defined]
        assert await round_trip(bystander) < 1.0
        bystander.disconnect()
        log = service.wait_for_log("the anchor")
        assert "is gone" in log
    finally:
        anchor.close()


# -- hostile and broken anchors -------------------------------------------------------------


def _hostile_anchor(sock: socket.socket, behaviour: str) -> None:
    """Answer the first request badly, in one of several ways."""
    request = sock.recv(4096)
    assert request.startswith(b"unix:")
    if behaviour == "no fd":
        sock.send(b"\x00")
    elif behaviour == "listening socket":
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(b"\0xdgc-test-hostile-" + str(os.getpid()).encode())
        lst.listen(1)
        sock.sendmsg([b"\x00"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  lst.fileno().to_bytes(4, sys.byteorder))])
        lst.close()
    elif behaviour == "datagram socket":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.sendmsg([b"\x00"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  a.fileno().to_bytes(4, sys.byteorder))])
        a.close()
        b.close()
    elif behaviour == "a pipe":
        r, w = os.pipe()
        sock.sendmsg([b"\x00"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  r.to_bytes(4, sys.byteorder))])
        os.close(r)
        os.close(w)
    elif behaviour == "garbage":
        sock.send(b"\x07garbage" * 100)
    elif behaviour == "error":
        sock.send(b"\x01no bus for you")
    elif behaviour == "never answers":
        time.sleep(8)
    elif behaviour == "dies mid-request":
        os._exit(0)


HOSTILE = ["no fd", "listening socket", "datagram socket", "a pipe", "garbage", "error",
           "never answers", "dies mid-request"]


@pytest.mark.parametrize("behaviour", HOSTILE)
async def test_hostile_anchor_costs_only_its_client(
    service: ServiceProcess, manager_bus: MessageBus, behaviour: str
) -> None:
    """(e) A broken or hostile anchor: its client loses its connection with one clear log
    line; a bystander on another server is served throughout."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ours.close()
        try:
            _hostile_anchor(theirs, behaviour)
            time.sleep(10)
        finally:
            os._exit(0)
    theirs.close()
    try:
        _bpath, bresults = await add_server(manager_bus, named=NO_STOP)
        bystander = await connect(bresults["Address"].value)
        _path, results = await add_server(
            manager_bus, "org.flatpak", "org.example.Hostile", "h",
            named={**NO_STOP, CONNECTOR: Variant("h", 0)}, unix_fds=[ours.fileno()],
        )
        ours.close()
        attempt = asyncio.ensure_future(connect(results["Address"].value))
        worst = 0.0
        while not attempt.done():
            worst = max(worst, await round_trip(bystander))
            await asyncio.sleep(0.05)
        with pytest.raises(Exception):  # noqa: B017 - EOF, reset or auth failure: all fine
            victim = attempt.result()
            await driver_call(victim, "GetId")
        assert worst < 1.0
        assert await round_trip(bystander) < 1.0
        text = service.wait_for_log("no bus connection" if behaviour != "dies mid-request"
                                    else "the anchor")
        lines = [ln for ln in text.splitlines() if "no bus connection" in ln or "is gone" in ln]
        assert len(lines) == 1, lines
        bystander.disconnect()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


async def test_connector_must_be_a_seqpacket_socket(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    """A Connector that is not a connected SOCK_SEQPACKET socket is InvalidArgs."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        from tests.conftest import call, error

        reply = await call(
            manager_bus, "AddServer", "sssa{sv}a{sv}",
            ["org.flatpak", "a", "b", {}, {CONNECTOR: Variant("h", 0)}], unix_fds=[a.fileno()],
        )
        assert "SOCK_SEQPACKET" in error(reply, "InvalidArgs")
    finally:
        a.close()
        b.close()


async def test_no_bubblewrap_is_failed_not_the_service_pid(
    bus: PrivateBus, runtime_dir: str, tmp_path: str
) -> None:
    """bwrap missing: AddServer fails with Failed saying why; no server, no own-pid fallback."""
    from tests.conftest import call, error, start_service

    bindir = os.path.join(str(tmp_path), "bin")
    os.mkdir(bindir)
    env = dict(os.environ)
    env["PATH"] = bindir  # no bwrap here
    sp = start_service(bus.address, runtime_dir, env=env)
    try:
        manager = await connect(bus.address)
        reply = await call(manager, "AddServer", "sssa{sv}a{sv}",
                           ["org.flatpak", "a", "b", {}, {}])
        text = error(reply, "Failed")
        assert "bubblewrap" in text and "bwrap" in text
        assert ok(await call(manager, "ListServers")) == [[]]
        manager.disconnect()
    finally:
        sp.finish()





# An ordinary user (bwrap in a user namespace): test_anchor_programs.py
# ::test_zygote_as_an_ordinary_user, for the C and the Python anchor, from copies uid 65534
# can run (a checkout under a 0700 directory is out of its reach).


async def test_a_dead_zygote_is_replaced_and_its_anchors_carry_on(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    """Killing the zygote ends no server: anchors already forked keep serving, and the
    next AddServer starts a new zygote."""
    from tests.support.processes import descendants

    _p1, r1 = await add_server(manager_bus, "org.flatpak", "org.example.Before", "b",
                               named=NO_STOP)
    c1 = await connect(r1["Address"].value)
    anchor1 = await bus_pid(manager_bus, c1.unique_name)
    zygotes = [
        p for p in descendants(service.process.pid)
        if p != anchor1 and b"zygote" in _cmdline(p)
        and not _cmdline(p).split(b"\0")[0].endswith(b"bwrap")
    ]
    assert zygotes, "no zygote below the service"
    for z in zygotes:
        os.kill(z, signal.SIGKILL)
    await asyncio.sleep(0.3)
    c1.disconnect()
    again = await connect(r1["Address"].value)  # a new connection through the old anchor
    assert await bus_pid(manager_bus, again.unique_name) == anchor1
    again.disconnect()
    _p2, r2 = await add_server(manager_bus, "org.flatpak", "org.example.After", "a",
                               named=NO_STOP)
    c2 = await connect(r2["Address"].value)
    anchor2 = await bus_pid(manager_bus, c2.unique_name)
    assert anchor2 != anchor1
    assert "name=org.example.After" in identity_of(anchor2, ".flatpak-info")
    c2.disconnect()


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""
