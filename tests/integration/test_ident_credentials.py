"""GetConnectionCredentials: identification a portal can trust (SPEC §2, §5).

The confined client here is a *separate process* (a small dbus-python script
connecting through the minted socket and staying alive until its stdin closes),
so the pid and pidfd the service reports can be told apart from the service's,
the launcher's (the AddServer caller: this test process) and the bus's.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from tests.conftest import IFACE, NAME, PATH, ServiceProcess, add_server, call, connect, error, ok
from tests.integration.helpers_c1 import DRIVER, Observer, close_fds, driver_call, socket_path_of
from tests.support.bus import PrivateBus
from tests.support.clients import CLI_ARGV, Call
from tests.support.commands import NOBODY, probe_as_nobody, reachable_by_others, run_cmd
from tests.support.names import PROPS, SERVER_IFACE
from tests.support.processes import fdinfo_pid
from tests.support.sasl import opening
from tests.support.wire import driver_call as driver_call_bytes

pytestmark = pytest.mark.timeout(60)

PATH_KEY = "org.freedesktop.DBus.Containers1.Path"
SO_PEERSEC = 31
APP = "org.example.IdentApp"

#: A confined client process: connects to every address in argv (dbus-python, blocking),
#: prints its unique names on one line, then stays connected until stdin closes.
_CHILD = r"""
import sys
import dbus.bus
conns = [dbus.bus.BusConnection(a) for a in sys.argv[1:]]
print(" ".join(str(c.get_unique_name()) for c in conns), flush=True)
sys.stdin.read()
"""


@asynccontextmanager
async def child_client(
    *addresses: str, **popen: Any
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    """Run the confined-client child; yields (process, its unique names, one per address).
    Leaving the block normally ends the child as ``end_child`` does."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        *addresses,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        if not line:
            assert proc.stderr is not None
            err = await proc.stderr.read()
            raise AssertionError(f"child client failed: {err.decode(errors='replace')}")
        names = line.decode().split()
        assert len(names) == len(addresses), names
        yield proc, names
        if proc.returncode is None:
            await end_child(proc)  # a clean exit of its own, checked
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def end_child(proc: asyncio.subprocess.Process) -> None:
    """Let the child exit on its own (stdin EOF) and reap it."""
    assert proc.stdin is not None
    proc.stdin.close()
    rc = await asyncio.wait_for(proc.wait(), 10)
    assert rc == 0, rc


def spawn_on_pid(pid: int) -> subprocess.Popen[bytes]:
    """Start a long-lived process, trying to give it ``pid`` (root: ns_last_pid).

    Plain Popen, not asyncio: asyncio's child watcher keys its threads by pid and trips
    over a pid number it saw before."""
    for _ in range(5):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w", encoding="ascii") as fh:
                fh.write(str(pid - 1))
        except OSError:
            pass
        proc = subprocess.Popen(["sleep", "30"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return subprocess.Popen(["sleep", "30"])


def process_fd(reply: Message) -> int:
    """The fd the ProcessFD entry of a GetConnectionCredentials reply points at."""
    creds = reply.body[0]
    var = creds["ProcessFD"]
    assert var.signature == "h", var
    index = var.value
    assert 0 <= index < len(reply.unix_fds), (index, reply.unix_fds)
    return int(reply.unix_fds[index])


def own_security_label() -> bytes | None:
    """What SO_PEERSEC says about a process in our own security context (None if nothing)."""
    a, b = socket.socketpair()
    try:
        raw = a.getsockopt(socket.SOL_SOCKET, SO_PEERSEC, 4096)
    except OSError:
        return None
    finally:
        a.close()
        b.close()
    label = raw.rstrip(b"\0")
    return label or None


async def credentials(bus: MessageBus, name: str) -> Message:
    """GetConnectionCredentials(name): the raw reply."""
    return await call(bus, "GetConnectionCredentials", "s", [name])


@asynccontextmanager
async def held_credentials(
    bus: MessageBus, name: str
) -> AsyncIterator[tuple[dict[str, Variant], Message]]:
    """GetConnectionCredentials(name), which must succeed: (the dict, the reply); the fds
    the reply carried are closed on exit."""
    reply = await credentials(bus, name)
    try:
        yield dict(ok(reply)[0]), reply
    finally:
        close_fds(reply)


async def our_credentials(bus: MessageBus, name: str) -> dict[str, Variant]:
    """The service's GetConnectionCredentials(name), which must succeed (fds closed)."""
    async with held_credentials(bus, name) as (creds, _):
        return creds


async def bus_credentials(bus: MessageBus, name: str) -> dict[str, Variant]:
    """What the real bus says about ``name`` (dbus-daemon's GetConnectionCredentials)."""
    reply = await driver_call(bus, "GetConnectionCredentials", "s", [name])
    close_fds(reply)
    return dict(ok(reply)[0])


# -- ProcessFD / ProcessID name the confined client process ---------------------------------


async def test_process_fd_and_pid_name_the_confined_child(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    path, results = await add_server(manager_bus, app_id=APP)
    address = results["Address"].value
    async with (
        child_client(address) as (child, (name,)),
        held_credentials(manager_bus, name) as (creds, reply),
    ):
        assert creds["ProcessID"].signature == "u"
        pid = creds["ProcessID"].value
        assert pid == child.pid
        # Not the service that accepted the socket, not the launcher, not the bus.
        assert pid != service.process.pid
        assert pid != os.getpid()
        bus_pid = ok(
            await driver_call(manager_bus, "GetConnectionUnixProcessID", "s", [DRIVER])
        )[0]
        assert pid != bus_pid
        fd = process_fd(reply)
        assert fdinfo_pid(fd) == child.pid
        # A live process: the pidfd is not readable yet, signal 0 reaches it.
        assert select.select([fd], [], [], 0)[0] == []
        signal.pidfd_send_signal(fd, 0)
        assert creds[PATH_KEY] == Variant("o", path)
        assert creds["UnixUserID"] == Variant("u", os.getuid())


async def test_pidfd_reports_the_exit_and_cannot_be_fooled_by_pid_reuse(
    service: ServiceProcess, manager_bus: MessageBus, observer: Observer
) -> None:
    _path, results = await add_server(manager_bus, app_id=APP)
    async with child_client(results["Address"].value) as (child, (name,)):
        reply = await credentials(manager_bus, name)
        ok(reply)
        # Keep our own copy of the pidfd past the reply.
        fd = os.dup(process_fd(reply))
        close_fds(reply)
        try:
            assert fdinfo_pid(fd) == child.pid
            await end_child(child)
            # The pidfd now says "gone": readable (poll), Pid: -1, no signal reaches it.
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            assert poller.poll(5000), "pidfd did not become readable after the child exited"
            assert fdinfo_pid(fd) == -1
            with pytest.raises(ProcessLookupError):
                signal.pidfd_send_signal(fd, 0)
            # Pid reuse: put another process on the very pid number the client had (as
            # root, via ns_last_pid; elsewhere just spawn a few). A pid-based check would
            # now find a live process; the pidfd still says the client is gone.
            impostor = spawn_on_pid(child.pid)
            try:
                if impostor.pid == child.pid:
                    os.kill(child.pid, 0)  # the number is alive again...
                assert fdinfo_pid(fd) == -1  # ...but not our process
                with pytest.raises(ProcessLookupError):
                    signal.pidfd_send_signal(fd, 0)
            finally:
                impostor.kill()
                impostor.wait()
        finally:
            os.close(fd)
    # The connection went with the process: the name is gone, and so is the answer.
    await observer.wait_name_gone(name)
    error(await credentials(manager_bus, name), "NameHasNoOwner")
    error(await call(manager_bus, "GetConnectionInfo", "s", [name]), "NameHasNoOwner")


# -- callers that cannot take an fd ------------------------------------------------------------


async def test_caller_without_fd_negotiation_gets_the_reply_without_process_fd(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    path, results = await add_server(manager_bus, app_id=APP)
    async with child_client(results["Address"].value) as (child, (name,)):
        no_fds = await connect(bus.address, negotiate_unix_fd=False)
        try:
            reply = await credentials(no_fds, name)
            creds = ok(reply)[0]
            assert reply.unix_fds == []
            assert "ProcessFD" not in creds
            assert creds["ProcessID"] == Variant("u", child.pid)
            assert creds["UnixUserID"] == Variant("u", os.getuid())
            assert creds[PATH_KEY] == Variant("o", path)
            # Again (the fallback is per reply, not a one-off), and interleaved with a
            # caller that does take fds: each gets what it can receive.
            both = await asyncio.gather(credentials(no_fds, name), credentials(manager_bus, name))
            try:
                assert "ProcessFD" not in ok(both[0])[0] and both[0].unix_fds == []
                assert fdinfo_pid(process_fd(both[1])) == child.pid
                without_fd = {k: v for k, v in ok(both[1])[0].items() if k != "ProcessFD"}
                assert without_fd == creds
            finally:
                close_fds(both[1])
            # The fd-less connection is still healthy afterwards.
            ok(await driver_call(no_fds, "GetId"))
        finally:
            no_fds.disconnect()


@pytest.mark.parametrize("tool", ["gdbus", "busctl", "dbus-send"])
async def test_cli_callers_get_the_credentials_without_error(
    tool: str, service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    """gdbus, busctl and dbus-send all negotiate fd passing on a unix socket (so each may get
    ProcessFD); what matters is that none gets an error and the values are right."""
    path, results = await add_server(manager_bus, app_id=APP)
    async with child_client(results["Address"].value) as (child, (name,)):
        call = Call(bus.address, NAME, PATH, IFACE, "GetConnectionCredentials", "s", [name])
        cmd = CLI_ARGV[tool](call)
        rc, out, err = await run_cmd(*cmd)
        assert rc == 0, err
        assert "Error" not in err, err
        assert "ProcessID" in out and str(child.pid) in out, out
        assert path in out, out
        assert "UnixUserID" in out and "UnixGroupIDs" in out, out
        if tool == "gdbus":
            assert f"'ProcessID': <uint32 {child.pid}>" in out, out
        elif tool == "busctl":
            assert f'"ProcessID" u {child.pid}' in out, out


# -- UnixUserID / UnixGroupIDs / LinuxSecurityLabel / Path ----------------------------------


async def test_user_groups_label_and_path_match_what_the_bus_says(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    """The child connects twice, directly to the bus and through our socket: our answer for
    the proxied connection must agree with dbus-daemon's for the direct one (same process).
    As root the child gets unusual supplementary groups, so the groups really are its own."""
    path, results = await add_server(manager_bus, app_id=APP)
    popen: dict[str, Any] = {}
    if os.getuid() == 0:
        popen["extra_groups"] = [0, 4242, 4343]
    async with child_client(bus.address, results["Address"].value, **popen) as (
        child,
        (direct, proxied),
    ):
        ours = await our_credentials(manager_bus, proxied)
        theirs = await bus_credentials(manager_bus, direct)
        assert ours["UnixUserID"] == Variant("u", os.getuid()) == theirs["UnixUserID"]
        assert ours["UnixGroupIDs"].signature == "au"
        assert sorted(ours["UnixGroupIDs"].value) == sorted(theirs["UnixGroupIDs"].value)
        if os.getuid() == 0:
            assert {4242, 4343} <= set(ours["UnixGroupIDs"].value)
        assert ours["ProcessID"] == Variant("u", child.pid) == theirs["ProcessID"]
        assert ours[PATH_KEY] == Variant("o", path)
        # LinuxSecurityLabel: present exactly when SO_PEERSEC gives one, as the bus does.
        label = own_security_label()
        assert ("LinuxSecurityLabel" in ours) == (label is not None), (ours, label)
        assert ("LinuxSecurityLabel" in ours) == ("LinuxSecurityLabel" in theirs), (ours, theirs)
        if label is not None:
            assert ours["LinuxSecurityLabel"].signature == "ay"
            assert ours["LinuxSecurityLabel"].value == label + b"\0"
            assert ours["LinuxSecurityLabel"].value == theirs["LinuxSecurityLabel"].value
        # Only the documented keys (ProcessFD was in the fd-carrying reply).
        assert set(ours) <= {
            "UnixUserID",
            "UnixGroupIDs",
            "ProcessID",
            "ProcessFD",
            "LinuxSecurityLabel",
            PATH_KEY,
        }, sorted(ours)
        assert "ProcessFD" in ours


async def test_path_names_the_right_server_and_outlives_stop_listening(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    path_a, res_a = await add_server(manager_bus, app_id="org.example.A")
    path_b, res_b = await add_server(manager_bus, app_id="org.example.B")
    async with child_client(res_a["Address"].value, res_b["Address"].value) as (
        child,
        (in_a, in_b),
    ):
        ok(await call(manager_bus, "StopListening", "o", [path_a]))
        for name, path in ((in_a, path_a), (in_b, path_b)):
            async with held_credentials(manager_bus, name) as (creds, reply):
                assert creds[PATH_KEY] == Variant("o", path)
                assert creds["ProcessID"] == Variant("u", child.pid)
                assert fdinfo_pid(process_fd(reply)) == child.pid


# -- errors: exactly GetConnectionInfo's -----------------------------------------------------


async def test_errors_are_exactly_get_connection_info_errors(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    _path, results = await add_server(manager_bus, app_id=APP)
    host = await connect(bus.address)
    confined = await connect(results["Address"].value)
    try:
        assert (await host.request_name("org.example.HostApp")).value == 1
        assert (await confined.request_name("org.example.ConfinedApp")).value == 1
        cases = {
            DRIVER: "NotContainer",
            ":1.99999": "NameHasNoOwner",
            "org.example.NobodyHere": "NameHasNoOwner",
            "not a bus name": "NameHasNoOwner",
            "": "NameHasNoOwner",
            host.unique_name: "NotContainer",
            "org.example.HostApp": "NotContainer",
            manager_bus.unique_name: "NotContainer",
            NAME: "NotContainer",  # the service itself is not in a container
        }
        for name, expected in cases.items():
            info = await call(manager_bus, "GetConnectionInfo", "s", [name])
            creds = await credentials(manager_bus, name)
            error(info, expected)
            error(creds, expected)
            assert creds.unix_fds == []
        # The confined connection, by unique and by well-known name: both succeed.
        for name in (confined.unique_name, "org.example.ConfinedApp"):
            info = ok(await call(manager_bus, "GetConnectionInfo", "s", [name]))
            creds = await our_credentials(manager_bus, name)
            assert creds[PATH_KEY].value == info[0]
            assert creds["ProcessID"] == Variant("u", os.getpid())
    finally:
        confined.disconnect()
        host.disconnect()


@pytest.mark.parametrize("filtered", [False, True], ids=["unfiltered", "filtered"])
async def test_confined_client_may_ask_about_itself_only(
    filtered: bool, service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    named: dict[str, Variant] = {}
    if filtered:
        named = {
            "org.freedesktop.XdgContainers1.Filter": Variant("b", True),
            "org.freedesktop.XdgContainers1.Policy": Variant(
                "a{ss}", {"org.example.SelfApp": "own"}
            ),
        }
    path, results = await add_server(manager_bus, app_id=APP, named=named)
    me = await connect(results["Address"].value)
    sibling = await connect(results["Address"].value)
    try:
        assert (await me.request_name("org.example.SelfApp")).value == 1
        for name in (me.unique_name, "org.example.SelfApp"):
            async with held_credentials(me, name) as (creds, reply):
                assert creds["ProcessID"] == Variant("u", os.getpid())
                assert creds["UnixUserID"] == Variant("u", os.getuid())
                assert creds[PATH_KEY] == Variant("o", path)
                # The pidfd crosses the proxy too (both sides negotiated fds).
                assert fdinfo_pid(process_fd(reply)) == os.getpid()
        # Anything else is AccessDenied, whether it exists, is confined or not, and
        # whether the server filters or not (the same question gets the same answer).
        others = (
            sibling.unique_name,
            manager_bus.unique_name,
            DRIVER,
            NAME,
            ":1.99999",
            "org.example.NobodyHere",
        )
        got: dict[tuple[str, str], str | None] = {}
        for other in others:
            for member in ("GetConnectionCredentials", "GetConnectionInfo"):
                reply = await call(me, member, "s", [other])
                assert reply.message_type == MessageType.ERROR, (member, other, reply.body)
                assert reply.unix_fds == []
                got[(member, other)] = reply.error_name
        denied = "org.freedesktop.DBus.Error.AccessDenied"
        assert got == {key: denied for key in got}, got
    finally:
        sibling.disconnect()
        me.disconnect()


# -- another uid is refused before anything reaches the bus -------------------------------------


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a child as another uid")
async def test_other_uid_is_refused_before_reaching_the_bus(
    service: ServiceProcess, manager_bus: MessageBus, observer: Observer, runtime_dir: str
) -> None:
    path, results = await add_server(manager_bus, app_id=APP)
    socket_path = socket_path_of(results)
    with reachable_by_others(socket_path, runtime_dir):
        # Claims the creator's uid and pipelines NEGOTIATE_UNIX_FD, BEGIN and a Hello.
        claim = opening(os.getuid(), fds=True) + driver_call_bytes(1, "Hello")
        child = await asyncio.to_thread(probe_as_nobody, socket_path, claim)
    assert child.returncode == 0, child.stderr
    # Closed without a word: no SASL answer, no Hello reply.
    assert child.stdout.strip() == f"CLOSED {NOBODY} b''", child.stdout
    await observer.sync()
    assert observer.new_unique_names() == [], "a connection reached the bus for another uid"
    props = ok(await call(manager_bus, "GetAll", "s", [SERVER_IFACE], path=path, interface=PROPS))[
        0
    ]
    assert props["Connections"].value == []
    assert props["MessagesForwarded"].value == 0
    assert props["Listening"].value is True
    service.wait_for_log(f"uid {NOBODY}")
    # The server still serves its own uid.
    async with child_client(results["Address"].value) as (own, (name,)):
        assert name.startswith(":")
        await end_child(own)
