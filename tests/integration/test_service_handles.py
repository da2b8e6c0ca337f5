"""Handle arguments index the fds attached to *this* message, nothing else (SPEC 3,
issue 16 findings 6 and 7).

A hand-made AddServer can carry ``<handle N>`` with no fd attached; dbus-fast then
leaves the bare index in the body. The service used to dup it as one of its own fd
numbers: ``ListenFD`` = the fd of another server's listening socket made a second,
unfiltered server accept on the victim's socket. Every such call is now InvalidArgs
saying which handle indexes nothing, and the victim's server is untouched. Methods
taking fds also work with NO_REPLY_EXPECTED (they failed on a private dbus-fast
method missing from the compiled wheel).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_fast import MessageType

from tests.conftest import ServiceProcess
from tests.integration.budget_helpers import MAX_BYSTANDER_RTT, peak_rss_kib
from tests.support.bus import PrivateBus
from tests.support.names import EXT, MANAGER, MANAGER_PATH
from tests.support.processes import wait_for
from tests.support.rawconn import RawConn, add_server
from tests.support.wire import NO_REPLY_EXPECTED, unix_path

pytestmark = pytest.mark.timeout(60)

LISTEN_FD = EXT + "ListenFD"
CONNECTOR = EXT + "Connector"
FILTER = EXT + "Filter"
HANDLE_KEYS = ("StopOnNotify", LISTEN_FD, CONNECTOR)
#: Words of an OS error or a traceback, which must never reach a caller.
LEAKY = ("Errno", "Traceback", "PermissionError", "OSError", "Bad file descriptor", "File \"")


def listening_fd_in(pid: int, socket_path: str) -> int:
    """The fd number, in process ``pid``, of the socket listening at ``socket_path``."""
    inode = None
    with open("/proc/net/unix") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == socket_path:
                inode = parts[6]
    assert inode is not None, f"no socket at {socket_path} in /proc/net/unix"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                return int(fd)
        except OSError:
            continue
    raise AssertionError(f"process {pid} holds no fd for {socket_path}")


def add_server_call(
    manager: RawConn, named: dict[str, tuple[str, Any]], fds: list[int] | None = None,
    flags: int = 0,
) -> int:
    """Send AddServer as given (handles and fds exactly as asked); return the serial."""
    return manager.send_call(
        MANAGER, MANAGER_PATH, MANAGER, "AddServer", "sssa{sv}a{sv}",
        ["org.example.Hostile", "org.example.Attacker", "attacker", {}, named],
        flags=flags, fds=fds or [],
    )


def list_servers(manager: RawConn) -> list[str]:
    """ListServers() over the raw connection."""
    reply = manager.call(MANAGER, MANAGER_PATH, MANAGER, "ListServers", timeout=10).msg
    assert reply.message_type == MessageType.METHOD_RETURN, reply
    return list(reply.body[0])


def server_of(manager: RawConn, unique_name: str) -> str:
    """GetConnectionInfo(name)'s server path (fails on an error)."""
    reply = manager.call(
        MANAGER, MANAGER_PATH, MANAGER, "GetConnectionInfo", "s", [unique_name], timeout=10
    ).msg
    assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    return str(reply.body[0])


def rtt(client: RawConn) -> float:
    """One GetId round trip through the client's server."""
    start = time.monotonic()
    reply = client.driver("GetId")
    assert reply.message_type == MessageType.METHOD_RETURN, reply
    return time.monotonic() - start


@pytest.fixture
def manager(service: ServiceProcess, bus: PrivateBus) -> Iterator[RawConn]:
    """A raw, fd-capable connection to the real bus (the attacker's launcher)."""
    with RawConn(bus.address, timeout=10).setup(fds=True) as conn:
        yield conn


@pytest.mark.parametrize("which", ["zero", "victim", "999"])
@pytest.mark.parametrize("key", HANDLE_KEYS)
def test_handle_without_attached_fd_is_invalid_args(
    service: ServiceProcess, manager: RawConn, key: str, which: str
) -> None:
    """``victim``: the handle is the fd number of another server's listening socket in
    the service (the attack: serve on it, unfiltered); ``zero``: the service's stdin;
    ``999``: nothing. With no fd attached all three are InvalidArgs."""
    victim_path, victim_address = add_server(manager, {FILTER: ("b", True)}, instance="victim")
    victim_fd = listening_fd_in(service.process.pid, unix_path(victim_address))
    handle = {"zero": 0, "victim": victim_fd, "999": 999}[which]
    with RawConn(victim_address).setup() as bystander:
        worst = rtt(bystander)
        serial = add_server_call(manager, {key: ("h", handle)})
        reply = manager.read_reply(serial, timeout=10).msg
        worst = max(worst, rtt(bystander))
        assert reply.message_type == MessageType.ERROR, (key, handle, reply.body)
        assert reply.error_name == "org.freedesktop.DBus.Error.InvalidArgs", reply
        text = str(reply.body[0])
        assert text == (
            f"named argument {key}: handle {handle} does not index a file "
            "descriptor attached to this message (0 attached)"
        ), text
        assert not any(w in text for w in LEAKY), text
        # The same without a reply wanted: refused quietly, nothing created.
        add_server_call(manager, {key: ("h", handle)}, flags=NO_REPLY_EXPECTED)
        assert list_servers(manager) == [victim_path]
        worst = max(worst, rtt(bystander))
        print(
            f"\nMEASURE stray handle {key}={which} (finding 6): bystander worst rtt "
            f"{worst * 1000:.1f} ms; service peak RSS {peak_rss_kib(service.process.pid)} KiB"
        )
        assert worst < MAX_BYSTANDER_RTT
        # The victim's socket is still served by the victim's server alone, filtered.
        assert server_of(manager, bystander.unique_name) == victim_path
        for _ in range(5):
            with RawConn(victim_address).setup() as fresh:
                assert server_of(manager, fresh.unique_name) == victim_path
                hidden = fresh.driver("GetNameOwner", "s", [MANAGER])
                assert hidden.error_name == "org.freedesktop.DBus.Error.NameHasNoOwner", hidden
    assert "Traceback" not in service.log(), service.log()


def test_handle_past_the_attached_fds_is_invalid_args(
    service: ServiceProcess, manager: RawConn
) -> None:
    for key in HANDLE_KEYS:
        r, w = os.pipe()
        try:
            serial = add_server_call(manager, {key: ("h", 1)}, fds=[r])
            reply = manager.read_reply(serial, timeout=10).msg
        finally:
            os.close(r)
            os.close(w)
        assert reply.error_name == "org.freedesktop.DBus.Error.InvalidArgs", reply
        assert str(reply.body[0]) == (
            f"named argument {key}: handle 1 does not index a file "
            "descriptor attached to this message (1 attached)"
        ), reply.body
    assert list_servers(manager) == []


def test_connector_must_be_a_seqpacket_unix_socket(
    service: ServiceProcess, manager: RawConn
) -> None:
    stream_a, stream_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        for fd in (stream_a.fileno(), r):
            serial = add_server_call(manager, {CONNECTOR: ("h", 0)}, fds=[fd])
            reply = manager.read_reply(serial, timeout=10).msg
            assert reply.error_name == "org.freedesktop.DBus.Error.InvalidArgs", reply
            assert CONNECTOR in str(reply.body[0]), reply.body
            assert not any(w_ in str(reply.body[0]) for w_ in LEAKY), reply.body
        ours, anchors = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, anchors:
            serial = add_server_call(manager, {CONNECTOR: ("h", 0)}, fds=[ours.fileno()])
            reply = manager.read_reply(serial, timeout=10).msg
            assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
            # (the server lives while its anchor's end is open: SPEC 10)
            assert len(list_servers(manager)) == 1
    finally:
        stream_a.close()
        stream_b.close()
        os.close(r)
        os.close(w)


def test_add_server_with_listen_fd_and_no_reply_expected(
    service: ServiceProcess, manager: RawConn
) -> None:
    other_path, other_address = add_server(manager, instance="bystander")
    bystander = RawConn(other_address).setup()
    worst = rtt(bystander)
    d = tempfile.mkdtemp(prefix="xdgc-noreply-")
    path = os.path.join(d, "sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen()
        add_server_call(manager, {LISTEN_FD: ("h", 0)}, fds=[sock.fileno()],
                        flags=NO_REPLY_EXPECTED)
        servers: list[str] = []

        def created() -> bool:
            servers[:] = [p for p in list_servers(manager) if p != other_path]
            return bool(servers)

        wait_for(created, "the server made by a no-reply AddServer", timeout=10)
        worst = max(worst, rtt(bystander))
        sock.close()  # the service has its own copy
        with RawConn(f"unix:path={path}").setup() as client:
            assert client.driver("GetId").message_type == MessageType.METHOD_RETURN
            assert server_of(manager, client.unique_name) == servers[0]
        worst = max(worst, rtt(bystander))
        print(
            f"\nMEASURE no-reply AddServer with fds (finding 7): bystander worst rtt "
            f"{worst * 1000:.1f} ms; service peak RSS {peak_rss_kib(service.process.pid)} KiB"
        )
        assert "Traceback" not in service.log(), service.log()
    finally:
        bystander.close()
        sock.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        os.rmdir(d)
