"""Faults around the proxy: the bus dies, the service is killed, a client half-closes, a
creator vanishes in the middle of AddServer, a peer dies with calls outstanding.

Nothing may hang, nothing may leak (sockets, fds, servers), and whatever was already
asked for is still answered when its answer can still come (SPEC §5).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import pytest
from dbus_fast import MessageType

from tests.conftest import ServiceProcess
from tests.support.bus import PrivateBus
from tests.support.names import DRIVER, DRIVER_PATH, MANAGER, MANAGER_PATH
from tests.support.processes import fd_count, wait_for
from tests.support.rawconn import RawConn, RawPeer, add_server, echo_handler
from tests.support.sasl import opening
from tests.support.wire import Received, driver_call, method_call

pytestmark = pytest.mark.timeout(60)

SLOW = "org.test.Slow"


def late_echo(delay: float) -> Any:
    def handler(peer: RawPeer, call: Received) -> tuple[float, list[bytes]] | None:
        out = echo_handler(peer, call)
        return None if out is None else (delay, out)

    return handler


def never_answer(peer: RawPeer, call: Received) -> None:
    return None


def list_servers(manager: RawConn) -> list[str]:
    reply = manager.call(MANAGER, MANAGER_PATH, MANAGER, "ListServers").msg
    assert reply.message_type == MessageType.METHOD_RETURN, reply
    return list(reply.body[0])


# -- the bus dies ---------------------------------------------------------------------------


def test_bus_dies(service: ServiceProcess, bus: PrivateBus) -> None:
    manager = RawConn(bus.address).setup()
    _path, address = add_server(manager)
    add_server(manager, instance="second")
    peer = RawPeer(bus.address, "org.test.Never", never_answer)
    idle = RawConn(address).setup()
    waiting = RawConn(address).setup()
    half = RawConn(address)  # still in the handshake
    half.send(b"\0AUTH EXTERNAL ")
    try:
        waiting.send_call("org.test.Never", "/", "org.test.I", "Wait")
        wait_for(lambda: len(peer.calls) == 1, "the call to reach the peer")
        bus.stop()
        rc = service.process.wait(10)
        assert rc != 0, "losing the bus is not a clean exit"
        assert "bus connection was lost" in service.log(), service.log()
        for c in (idle, waiting, half):
            assert c.wait_eof(5), "a confined client was left hanging"
        assert service.sockets() == [], "sockets left behind after the bus died"
    finally:
        for c in (idle, waiting, half, manager):
            c.close()
        peer.stop()


# -- the service is killed --------------------------------------------------------------------


def test_sigkill_then_restart_removes_only_stale_sockets(
    service_factory: Any, bus: PrivateBus, runtime_dir: str
) -> None:
    first = service_factory()
    manager = RawConn(bus.address).setup()
    socks = [add_server(manager, instance=f"i{i}")[1] for i in range(3)]
    client = RawConn(socks[0]).setup()
    directory = os.path.join(runtime_dir, "dbus-1", "containers")
    # Someone else's live socket in the same directory, and a file that is no socket.
    foreign_path = os.path.join(directory, "dbus-foreign-live")
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    foreign.bind(foreign_path)
    foreign.listen(1)
    plain = os.path.join(directory, "dbus-not-a-socket")
    with open(plain, "w") as fh:
        fh.write("x")
    try:
        first.process.kill()
        first.process.wait(5)
        assert client.wait_eof(5), "a client of the killed service did not get EOF"
        assert len(first.sockets()) == 5, "SIGKILL cannot unlink anything"
        # Their creator leaves too: the servers are not brought back (SPEC 13), their
        # sockets are stale.
        manager.close()
        second = service_factory()
        remaining = second.sockets()
        assert remaining == ["dbus-foreign-live", "dbus-not-a-socket"], remaining
        # Their records said whose they were: removed as not brought back (the fd
        # store's copies let go), not left for the stale-socket probe.
        assert second.log().count("not brought back") == 3, second.log()
        # The new instance works.
        manager.close()
        manager = RawConn(bus.address).setup()
        _p, address = add_server(manager, instance="after")
        with RawConn(address).setup() as c:
            assert c.driver("GetId").message_type == MessageType.METHOD_RETURN
    finally:
        foreign.close()
        for p in (foreign_path, plain):
            if os.path.exists(p):
                os.unlink(p)
        client.close()
        manager.close()


# -- half-close -------------------------------------------------------------------------------


def _drain_until_eof(c: RawConn, timeout: float) -> list[Received]:
    got: list[Received] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no EOF within {timeout}s; got {[r.msg for r in got]}"
        r = c.read_message(left)
        if r is None:
            return got
        got.append(r)


def test_half_close_after_pipelining_calls(service: ServiceProcess, bus: PrivateBus) -> None:
    manager = RawConn(bus.address).setup()
    _path, address = add_server(manager)
    peer = RawPeer(bus.address, SLOW, late_echo(0.3))
    try:
        with RawConn(address).setup() as c:
            serials = [
                c.send_call(SLOW, "/", "org.test.I", "Echo", "s", [f"m{i}"]) for i in range(5)
            ]
            serials.append(c.send_call(DRIVER, DRIVER_PATH, DRIVER, "GetId"))
            c.sock.shutdown(socket.SHUT_WR)
            got = _drain_until_eof(c, 10)
            replies = {r.msg.reply_serial: r.msg for r in got if r.msg.reply_serial}
            assert sorted(replies) == sorted(serials), [r.msg for r in got]
            assert [replies[s].body for s in serials[:5]] == [[f"m{i}"] for i in range(5)]
        assert service.process.poll() is None
    finally:
        peer.stop()
        manager.close()


def test_half_close_right_after_a_fully_pipelined_start(
    service: ServiceProcess, bus: PrivateBus
) -> None:
    """AUTH, BEGIN, Hello and calls in one write, then SHUT_WR: a client such as a shell
    pipeline into socat. The calls were sent before the half-close; their replies must
    still arrive before the proxy closes."""
    manager = RawConn(bus.address).setup()
    _path, address = add_server(manager)
    peer = RawPeer(bus.address, SLOW, late_echo(0.2))
    try:
        with RawConn(address) as c:
            data = opening() + driver_call(1, "Hello")
            data += b"".join(
                method_call(2 + i, SLOW, "/", "org.test.I", "Echo", "s", [f"p{i}"])
                for i in range(3)
            )
            data += driver_call(5, "GetId")
            c.send(data)
            c.sock.shutdown(socket.SHUT_WR)
            assert c.read_line().startswith(b"OK ")
            got = _drain_until_eof(c, 10)
            answered = sorted(r.msg.reply_serial for r in got if r.msg.reply_serial)
            assert answered == [1, 2, 3, 4, 5], (
                f"only {answered} answered before the proxy closed; log:\n{service.log()[-2000:]}"
            )
    finally:
        peer.stop()
        manager.close()


# -- the creator disappears mid-AddServer ----------------------------------------------------------


def test_creator_disappears_mid_add_server(service: ServiceProcess, bus: PrivateBus) -> None:
    pid = service.process.pid
    observer = RawConn(bus.address).setup()
    try:
        assert list_servers(observer) == []
        # One server first: the anchor zygote (SPEC 10) starts with the first AddServer
        # and keeps its control socket; the baseline includes it.
        warm = RawConn(bus.address).setup()
        add_server(warm)
        warm.close()
        wait_for(lambda: list_servers(observer) == [], "the first server to be removed")
        fds_before = fd_count(pid)
        for i in range(30):
            creator = RawConn(bus.address).setup(fds=True)
            named: dict[str, Any] = {}
            fds: list[int] = []
            if i % 3 == 1:
                r, w = os.pipe()
                named["StopOnNotify"] = ("h", 0)
                fds = [r]
            body = ["org.example.Hostile", "org.example.App", f"gone{i}", {}, named]
            creator.send(
                method_call(
                    creator.next_serial(),
                    MANAGER,
                    MANAGER_PATH,
                    MANAGER,
                    "AddServer",
                    "sssa{sv}a{sv}",
                    body,
                    unix_fds=len(fds),
                ),
                fds,
            )
            if i % 2:
                time.sleep(0.002 * (i % 7))
            creator.close()
            for fd in fds:
                os.close(fd)
            if named:
                os.close(w)
        # Whatever was created stops listening (StopOnDisconnect) and, having no
        # connections, is removed: no servers, no sockets, no fds kept.
        wait_for(lambda: list_servers(observer) == [], "every orphan server to be removed")
        wait_for(lambda: service.sockets() == [], "every orphan socket to be unlinked")
        wait_for(lambda: fd_count(pid) <= fds_before, "the service's fds back to the baseline")
        assert service.process.poll() is None
        # The service still creates working servers.
        manager = RawConn(bus.address).setup()
        _p, address = add_server(manager)
        with RawConn(address).setup() as c:
            assert c.driver("GetId").message_type == MessageType.METHOD_RETURN
        manager.close()
    finally:
        observer.close()


# -- a peer dies with calls outstanding ---------------------------------------------------------


def test_peer_dies_with_calls_outstanding(service: ServiceProcess, bus: PrivateBus) -> None:
    manager = RawConn(bus.address).setup()
    _path, address = add_server(manager)
    peer = RawPeer(bus.address, "org.test.Never", never_answer)
    try:
        with RawConn(address).setup() as c:
            serials = [c.send_call("org.test.Never", "/", "org.test.I", "Wait") for _ in range(3)]
            wait_for(lambda: len(peer.calls) == 3, "the calls to reach the peer")
            peer.stop()
            for s in serials:
                r = c.read_reply(s, timeout=5)
                assert r.msg.message_type == MessageType.ERROR
                assert r.msg.error_name == "org.freedesktop.DBus.Error.NoReply", r.msg
            assert c.driver("GetId").message_type == MessageType.METHOD_RETURN
    finally:
        peer.stop()
        manager.close()
