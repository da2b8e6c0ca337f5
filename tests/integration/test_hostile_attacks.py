"""Known attacks by a hostile confined client, one test each (SPEC §5, §7).

Every test acts as a hostile client on a minted socket with hand-made bytes
(``test_hostile_wire.RawConn``), then checks, through ``Target.assert_healthy``, that:

- the service process is alive,
- a well-behaved client through the *same* server still authenticates, says Hello and
  gets an answer from the bus,
- when the service closed the hostile connection, its log names the reason.

Each test gets its own dbus-daemon and service (the fixtures cost ~0.15 s).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from dbus_fast import MessageType

from tests.conftest import ServiceProcess
from tests.support.bus import PrivateBus
from tests.support.names import EXT, MANAGER, MANAGER_PATH
from tests.support.processes import fd_count, rss_kib, stable_fd_count, wait_for
from tests.support.rawconn import RawConn, RawPeer, add_server, echo_handler
from tests.support.sasl import auth_line
from tests.support.sasl import opening as sasl_opening
from tests.support.wire import (
    DRIVER,
    DRIVER_PATH,
    F_DESTINATION,
    F_INTERFACE,
    F_MEMBER,
    F_PATH,
    F_REPLY_SERIAL,
    F_SIGNATURE,
    METHOD_CALL,
    METHOD_RETURN,
    NO_REPLY_EXPECTED,
    Received,
    build_message,
    driver_call,
    method_call,
    method_return,
    signal,
)

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
LOCAL_PATH = "/org/freedesktop/DBus/Local"
LOCAL_IFACE = "org.freedesktop.DBus.Local"
ECHO = "org.test.Echo"


@dataclass
class Target:
    """A service, one server on it, and the manager connection that created it."""

    service: ServiceProcess
    bus: PrivateBus
    manager: RawConn
    path: str
    address: str

    @property
    def pid(self) -> int:
        return self.service.process.pid

    def connect(self, timeout: float = 5.0) -> RawConn:
        """A raw connection to the server (no handshake)."""
        return RawConn(self.address, timeout)

    def client(self, fds: bool = False) -> RawConn:
        """A well-behaved client: handshake and Hello done."""
        return self.connect().setup(fds)

    def settled_fd_count(self) -> int:
        """The service's fds once a client came and went: the spare bus connection kept
        for the next client (proxy/spare.py) is then part of the baseline."""
        with self.client() as c:
            c.driver("GetId")
        return stable_fd_count(self.pid)

    def assert_healthy(self, reason: str | None = None) -> None:
        """Service alive, a fresh client works through this server, ``reason`` logged."""
        assert self.service.process.poll() is None, f"service died:\n{self.service.log()}"
        with self.client() as c:
            reply = c.driver("GetId")
            assert reply.message_type == MessageType.METHOD_RETURN, reply
            assert len(reply.body[0]) == 32
            owner = c.driver("GetNameOwner", "s", [c.unique_name])
            assert owner.body == [c.unique_name]
        if reason is not None:
            self.service.wait_for_log(reason)


def make_target(service: ServiceProcess, bus: PrivateBus, named: dict[str, Any]) -> Target:
    manager = RawConn(bus.address, timeout=10).setup(fds=True)
    path, address = add_server(manager, named)
    return Target(service, bus, manager, path, address)


@pytest.fixture
def target(service: ServiceProcess, bus: PrivateBus) -> Iterator[Target]:
    """An unfiltered server (only the always-on rules apply)."""
    t = make_target(service, bus, {})
    yield t
    t.manager.close()


FILTERED = {
    EXT + "Filter": ("b", True),
    EXT + "Policy": ("a{ss}", {ECHO: "talk", "org.test.Seen": "see"}),
}


@pytest.fixture(params=["unfiltered", "filtered"])
def any_target(
    request: pytest.FixtureRequest, service: ServiceProcess, bus: PrivateBus
) -> Iterator[Target]:
    """Both kinds of server: unfiltered, and filtered with ``org.test.Echo`` at talk."""
    t = make_target(service, bus, FILTERED if request.param == "filtered" else {})
    yield t
    t.manager.close()


@pytest.fixture
def echo(bus: PrivateBus) -> Iterator[RawPeer]:
    """A peer owning org.test.Echo that answers every call with its body."""
    peer = RawPeer(bus.address, ECHO)
    yield peer
    peer.stop()


@pytest.fixture
def slow_echo(bus: PrivateBus) -> Iterator[RawPeer]:
    """A peer owning org.test.Echo that answers every call with its body, 0.2 s later."""

    def late(peer: RawPeer, call: Received) -> tuple[float, list[bytes]] | None:
        out = echo_handler(peer, call)
        return None if out is None else (0.2, out)

    peer = RawPeer(bus.address, ECHO, late)
    yield peer
    peer.stop()


def answer(conn: RawConn, data: bytes, expected: bytes) -> None:
    """Send handshake bytes; the server's next line starts with ``expected``."""
    conn.send(data)
    line = conn.read_line()
    assert line.startswith(expected), line


def closed_once_the_line_ends(conn: RawConn, quiet: float) -> None:
    """What was sent is an unfinished handshake line: nothing comes back for ``quiet``
    seconds, and once the line ends its binary bytes get the connection closed."""
    assert no_data_for(conn, quiet)
    conn.send(b"\r\n")
    assert read_all_until_eof(conn) == b""


def read_all_until_eof(conn: RawConn, timeout: float = 5.0) -> bytes:
    """Everything the service still sends before it closes (fails if it does not close)."""
    data = bytes(conn.buf)
    conn.buf.clear()
    conn.sock.settimeout(timeout)
    while True:
        try:
            chunk = conn.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"connection not closed within {timeout}s") from None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def no_data_for(conn: RawConn, seconds: float) -> bool:
    """True if nothing at all (no data, no EOF) arrives within ``seconds``."""
    if conn.buf:
        return False
    conn.sock.settimeout(seconds)
    try:
        conn.sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    return False


# -- SASL ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opening",
    [b"AUTH EXTERNAL 30\r\n", b" \0AUTH EXTERNAL 30\r\n", b"\xff\0", b"\r\n"],
    ids=["no-nul", "space-then-nul", "0xff-then-nul", "bare-crlf"],
)
def test_bytes_before_the_nul(target: Target, opening: bytes) -> None:
    with target.connect() as c:
        c.send(opening)
        assert read_all_until_eof(c) == b"", "the service answered a stream without the NUL"
    target.assert_healthy("client handshake failed: bytes before the leading NUL byte")


def test_begin_before_ok_is_refused_and_never_starts_messages(target: Target) -> None:
    with target.connect() as c:
        # A client that thinks it may skip AUTH: BEGIN and a Hello right away.
        answer(c, b"\0BEGIN\r\n" + driver_call(1, "Hello"), b"ERROR")
        # The Hello is an unfinished handshake line, not a message: no answer comes.
        closed_once_the_line_ends(c, 0.5)
    target.assert_healthy("handshake line has non-ASCII or control bytes")


def test_begin_before_ok_then_a_proper_handshake_works(target: Target) -> None:
    with target.connect() as c:
        answer(c, b"\0BEGIN\r\n", b"ERROR")
        answer(c, auth_line(), b"OK ")
        c.send(b"BEGIN\r\n")
        assert c.hello().startswith(":")
    target.assert_healthy()


@pytest.mark.parametrize("suffix", [b"\t", b" ", b" \t \t"], ids=["tab", "space", "mixed"])
def test_begin_followed_by_blanks_is_begin(target: Target, suffix: bytes) -> None:
    """dbus-daemon accepts ``BEGIN`` followed by blanks; so do we (SPEC §5)."""
    with target.connect() as c:
        begin = b"BEGIN" + suffix + b"\r\n"
        answer(c, b"\0" + auth_line() + begin + driver_call(1, "Hello"), b"OK ")
        reply = c.read_reply(1)
        assert reply.msg.message_type == MessageType.METHOD_RETURN
        assert str(reply.msg.body[0]).startswith(":")
    target.assert_healthy()


def test_lowercase_commands_are_not_commands(target: Target) -> None:
    uid_hex = str(os.getuid()).encode().hex().encode()
    with target.connect() as c:
        answer(c, b"\0auth external " + uid_hex + b"\r\n", b"ERROR")
        answer(c, b"Auth EXTERNAL " + uid_hex + b"\r\n", b"ERROR")
        answer(c, auth_line(), b"OK ")
        answer(c, b"negotiate_unix_fd\r\n", b"ERROR")
        # "begin" is not BEGIN: the Hello after it is read as an unfinished handshake line.
        answer(c, b"begin\r\n" + driver_call(1, "Hello"), b"ERROR")
        closed_once_the_line_ends(c, 0.3)
    target.assert_healthy("handshake line has non-ASCII or control bytes")


def test_lowercase_begin_then_begin_works(target: Target) -> None:
    with target.connect() as c:
        answer(c, b"\0" + auth_line(), b"OK ")
        answer(c, b"begin\r\n", b"ERROR")
        c.send(b"BEGIN\r\n")
        assert c.hello().startswith(":")
    target.assert_healthy()


@pytest.mark.parametrize("crlf", [True, False], ids=["with-crlf", "without-crlf"])
def test_17_kib_handshake_line(target: Target, crlf: bool) -> None:
    rss_before = rss_kib(target.pid)
    with target.connect() as c:
        line = b"AUTH EXTERNAL " + b"33" * (17 * 1024 // 2)
        c.send(b"\0" + line + (b"\r\n" if crlf else b""))
        assert read_all_until_eof(c) == b""
    target.assert_healthy("handshake line longer than 16384 bytes")
    assert rss_kib(target.pid) - rss_before < 8 * 1024


@pytest.mark.parametrize(
    "lines, reason",
    [
        ([auth_line(uid=os.getuid() + 1)] * 8, "too many rejected authentication attempts"),
        ([b"AUTH DBUS_COOKIE_SHA1 30\r\n"] * 8, "too many rejected authentication attempts"),
        ([b"NEGOTIATE_UNIX_FD\r\n"] * 70, "more than 64 handshake commands"),
        ([b"AUTH EXTERNAL \xc3\xa9\r\n"], "non-ASCII or control bytes"),
        ([b"AUTH EXTERNAL 30\x00\r\n"], "non-ASCII or control bytes"),
    ],
    ids=["other-uid", "other-mechanism", "command-flood", "non-ascii", "nul-in-line"],
)
def test_handshake_abuse_is_cut_short(target: Target, lines: list[bytes], reason: str) -> None:
    with target.connect() as c:
        c.send(b"\0" + b"".join(lines))
        rest = read_all_until_eof(c)
        assert b"OK " not in rest, rest
    target.assert_healthy(reason)


def test_a_uid_that_is_not_ours_is_rejected_not_accepted(target: Target) -> None:
    with target.connect() as c:
        c.send(b"\0" + auth_line(uid=0 if os.getuid() else 1))
        assert c.read_line() == b"REJECTED EXTERNAL\r\n"
        answer(c, auth_line(), b"OK ")
    target.assert_healthy()


# -- sizes a header claims -----------------------------------------------------------------


def claiming_header(total: int, serial: int = 2) -> bytes:
    """The header of a call to GetId whose fixed header claims a ``total``-byte message."""
    fields = [
        (F_PATH, "o", DRIVER_PATH),
        (F_INTERFACE, "s", DRIVER),
        (F_MEMBER, "s", "GetId"),
        (F_DESTINATION, "s", DRIVER),
        (F_SIGNATURE, "g", "ay"),
    ]
    head = build_message(METHOD_CALL, serial, fields, b"")
    return build_message(METHOD_CALL, serial, fields, b"", body_length=total - len(head))


def test_header_claiming_127_mib_on_8_connections(target: Target) -> None:
    """Under max_message_bytes: the connections wait for the bytes; nothing is reserved."""
    pid = target.pid
    rss_before = rss_kib(pid)
    fds_before = target.settled_fd_count()
    conns = [target.client() for _ in range(8)]
    try:
        for c in conns:
            c.send(claiming_header(127 * MiB) + b"\xab" * (256 * 1024))
        # A well-behaved client keeps working meanwhile.
        target.assert_healthy()
        grown = rss_kib(pid) - rss_before
        assert grown < 30 * 1024, f"service RSS grew by {grown} KiB for 8 x 127 MiB claims"
        for c in conns:
            assert c.still_open(0.05), "a connection under the limit was dropped"
    finally:
        for c in conns:
            c.close()
    wait_for(lambda: fd_count(pid) <= fds_before, "the service's fds back to the baseline")
    assert rss_kib(pid) - rss_before < 30 * 1024


@pytest.mark.parametrize(
    "total",
    [128 * MiB + 8, 0xFFFFFFFF],
    ids=["128MiB+8", "4GiB"],
)
def test_header_claiming_more_than_128_mib_closes_at_once(target: Target, total: int) -> None:
    with target.client() as c:
        # Claimed size is computed from the header only: the body length lies.
        c.send(claiming_header(total))
        assert c.wait_eof(2), "the connection stayed open"
    target.assert_healthy("exceeds the limit of 134217728")


def test_header_field_array_over_64_mib_closes(target: Target) -> None:
    with target.client() as c:
        fixed = struct.pack("<BBBBIII", 0x6C, METHOD_CALL, 0, 1, 0, 2, 64 * MiB + 8)
        c.send(fixed + b"\0" * 64)
        assert c.wait_eof(2)
    target.assert_healthy("header field array of")


def test_claim_over_a_configured_limit_closes_at_once(
    service_factory: Any, bus: PrivateBus
) -> None:
    sp = service_factory("--limit", "max_message_bytes=1048576")
    t = make_target(sp, bus, {})
    try:
        with t.client() as c:
            c.send(claiming_header(2 * MiB))
            assert c.wait_eof(2), "a 2 MiB claim over a 1 MiB limit kept the connection"
        t.assert_healthy("exceeds the limit of 1048576")
        # Exactly at the limit is fine (and really delivered).
        with t.client() as c:
            head = claiming_header(1 * MiB, serial=9)
            body = MiB - len(head)
            c.send(head + struct.pack("<I", body - 4) + b"\xab" * (body - 4))
            reply = c.read_reply(9)
            # GetId takes no arguments: the bus answers InvalidArgs, but it got the message.
            assert reply.msg.message_type == MessageType.ERROR
            assert reply.msg.error_name == "org.freedesktop.DBus.Error.InvalidArgs"
    finally:
        t.manager.close()


# -- unix fds -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "declared, sent, reason",
    [
        (2, 1, "message declares 2 unix fds but only 1 arrived"),
        (1, 2, "1 unix fds arrived with no message declaring them"),
        (0, 1, "1 unix fds arrived with no message declaring them"),
        (0, 3, "3 unix fds arrived with no message declaring them"),
    ],
    ids=["more-declared", "fewer-declared", "undeclared-1", "undeclared-3"],
)
def test_fd_count_not_matching_the_header(
    target: Target, declared: int, sent: int, reason: str
) -> None:
    pid = target.pid
    fds_before = target.settled_fd_count()  # after a client: what the service keeps
    with target.client(fds=True) as c:
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(sent)]
        try:
            serial = c.next_serial()
            c.send(
                method_call(serial, DRIVER, DRIVER_PATH, DRIVER, "GetId", unix_fds=declared), fds
            )
        finally:
            for fd in fds:
                os.close(fd)
        assert c.wait_eof(2), "the service kept a connection whose fds do not add up"
    target.assert_healthy(reason)
    wait_for(lambda: fd_count(pid) <= fds_before, "the service to close every fd it received")


def test_fds_declared_without_negotiating_them(target: Target) -> None:
    pid = target.pid
    fds_before = target.settled_fd_count()
    with target.client(fds=False) as c:
        fd = os.open(os.devnull, os.O_RDONLY)
        try:
            c.send(
                method_call(c.next_serial(), DRIVER, DRIVER_PATH, DRIVER, "GetId", unix_fds=1), [fd]
            )
        finally:
            os.close(fd)
        assert c.wait_eof(2)
    target.assert_healthy("message declares 1 unix fds but only 0 arrived")
    wait_for(lambda: fd_count(pid) <= fds_before, "the service's fds back to the baseline")


def test_matching_fds_still_pass(target: Target, echo: RawPeer) -> None:
    """Control for the fd tests: a well-formed message with an fd reaches the peer."""
    with target.client(fds=True) as c:
        r, w = os.pipe()
        try:
            reply = c.call(ECHO, "/", "org.test.I", "Echo", "h", [0], fds=[r])
        finally:
            os.close(r)
            os.close(w)
        assert reply.msg.message_type == MessageType.METHOD_RETURN, reply.msg
    target.assert_healthy()


# -- many Hellos, serials ----------------------------------------------------------------------


def test_thousands_of_hellos(any_target: Target) -> None:
    t = any_target
    pid = t.pid
    other = t.client()
    try:
        with t.client() as c:
            name = c.unique_name
            rss_before = rss_kib(pid)
            c.send(b"".join(driver_call(s, "Hello") for s in range(100, 3100)))
            sentinel = c.send_call(DRIVER, DRIVER_PATH, DRIVER, "GetId")
            answered = 0
            while True:
                r = c.read_message(20)
                assert r is not None, "the connection was closed"
                rs = r.msg.reply_serial
                if rs == sentinel:
                    assert r.msg.message_type == MessageType.METHOD_RETURN
                    break
                if 100 <= rs < 3100:
                    assert r.msg.message_type == MessageType.ERROR, r.msg
                    answered += 1
            assert answered == 3000, "every extra Hello gets its own error"
            assert c.driver("GetNameOwner", "s", [name]).body == [name]
            grown = rss_kib(pid) - rss_before
            assert grown < 20 * 1024, f"service RSS grew by {grown} KiB"
        assert other.driver("GetId").message_type == MessageType.METHOD_RETURN
    finally:
        other.close()
    t.assert_healthy()


def test_serials_near_2_32(any_target: Target, echo: RawPeer) -> None:
    with any_target.client() as c:
        for serial in (0xFFFFFFFF, 0xFFFFFFFE, 0x80000000, 0x7FFFFFFF):
            c.send_call(DRIVER, DRIVER_PATH, DRIVER, "GetId", serial=serial)
            r = c.read_reply(serial)
            assert r.msg.message_type == MessageType.METHOD_RETURN
            c.send_call(ECHO, "/", "org.test.I", "Echo", "s", [f"s{serial}"], serial=serial)
            r = c.read_reply(serial)
            assert r.msg.body == [f"s{serial}"], r.msg
        # Wrapping round to 1 (already used by Hello) still works.
        c.send_call(DRIVER, DRIVER_PATH, DRIVER, "GetId", serial=1)
        assert c.read_reply(1).msg.message_type == MessageType.METHOD_RETURN
    any_target.assert_healthy()


def test_reused_serials_one_after_another(any_target: Target, echo: RawPeer) -> None:
    with any_target.client() as c:
        for i in range(5):
            c.send_call(ECHO, "/", "org.test.I", "Echo", "s", [f"round {i}"], serial=7)
            assert c.read_reply(7).msg.body == [f"round {i}"]
            c.send_call(DRIVER, DRIVER_PATH, DRIVER, "GetNameOwner", "s", [ECHO], serial=7)
            assert c.read_reply(7).msg.body == [echo.conn.unique_name]
    any_target.assert_healthy()


def test_reused_serials_pipelined_to_the_bus(any_target: Target) -> None:
    """Two driver calls in flight with one serial: the bus answers both; both arrive."""
    with any_target.client() as c:
        c.send(driver_call(7, "GetNameOwner", "s", [DRIVER]) + driver_call(7, "GetId"))
        first = c.read_reply(7, timeout=2)
        assert first.msg.body == [DRIVER], first.msg
        second = c.read_reply(7, timeout=2)
        assert second.msg.message_type == MessageType.METHOD_RETURN
        assert len(second.msg.body[0]) == 32
    any_target.assert_healthy()


def test_reused_serials_pipelined_to_a_peer(any_target: Target, slow_echo: RawPeer) -> None:
    """Two calls in flight with one serial: dbus-daemon answers the second itself with
    AccessDenied ("same reply serial as a currently-outstanding ... call") and the peer
    answers the first; the proxy must deliver both replies."""
    with any_target.client() as c:
        c.send(
            method_call(9, ECHO, "/", "org.test.I", "Echo", "s", ["one"])
            + method_call(9, ECHO, "/", "org.test.I", "Echo", "s", ["two"])
        )
        got = [c.read_reply(9, timeout=2).msg for _ in range(2)]
        kinds = sorted((m.message_type.name, m.error_name or "") for m in got)
        assert kinds == [
            ("ERROR", "org.freedesktop.DBus.Error.AccessDenied"),
            ("METHOD_RETURN", ""),
        ], got
        assert [m.body for m in got if m.message_type == MessageType.METHOD_RETURN] == [["one"]]
    any_target.assert_healthy()


# -- the reserved Local path and interface -----------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        signal(5, LOCAL_PATH, "org.example.I", "Boo"),
        signal(5, "/x", LOCAL_IFACE, "Disconnected"),
        method_call(5, DRIVER, LOCAL_PATH, DRIVER, "GetId"),
        method_call(5, DRIVER, DRIVER_PATH, LOCAL_IFACE, "GetId"),
    ],
    ids=["signal-local-path", "signal-local-interface", "call-local-path", "call-local-iface"],
)
def test_message_to_the_local_path_or_interface(any_target: Target, message: bytes) -> None:
    """dbus-daemon disconnects whoever uses the reserved Local path or interface: that
    client gets EOF, other clients are fine. (A filter may instead refuse the message
    itself, with an error reply: then it never reached the bus and the client lives on.)"""
    t = any_target
    bystander = t.client()
    try:
        with t.client() as c:
            c.send(message)
            try:
                r = c.read_reply(5, timeout=5)
            except EOFError:
                closed = True
            else:
                closed = False
                assert t.path and r.msg.message_type == MessageType.ERROR, r.msg
                assert r.msg.error_name == "org.freedesktop.DBus.Error.AccessDenied", r.msg
                assert c.driver("GetId").message_type == MessageType.METHOD_RETURN
        assert bystander.driver("GetId").message_type == MessageType.METHOD_RETURN
    finally:
        bystander.close()
    t.assert_healthy("bus closed the connection" if closed else "is not allowed in a container")


# -- other protocol abuse -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "invalid endianness byte"),
        (
            struct.pack("<BBBBIII", 0x6C, 1, 0, 2, 0, 1, 0) + b"\0" * 8,
            "unsupported protocol version 2",
        ),
        (
            build_message(METHOD_CALL, 0, [(F_PATH, "o", "/"), (F_MEMBER, "s", "M")]),
            "serial 0 is not allowed",
        ),
        (build_message(METHOD_CALL, 4, [(F_PATH, "o", "/")]), "method call without path or member"),
        (build_message(9, 4, [(F_PATH, "o", "/"), (F_MEMBER, "s", "M")]), "unknown message type"),
        # A bare 16-byte fixed header: no fields, no body.
        (
            struct.pack("<BBBBIII", 0x6C, METHOD_CALL, 0, 1, 0, 4, 0),
            "method call without path or member",
        ),
        (struct.pack(">BBBBIII", 0x42, 2, 0, 1, 0, 4, 0), "method return without reply serial"),
    ],
    ids=[
        "http",
        "version-2",
        "serial-0",
        "no-member",
        "type-9",
        "bare-header-le",
        "bare-header-be",
    ],
)
def test_garbage_after_begin(target: Target, payload: bytes, reason: str) -> None:
    with target.client() as c:
        c.send(payload)
        assert c.wait_eof(2)
    target.assert_healthy(reason)


def _not_hello_first(address: str) -> list[tuple[str, str]]:
    outcome: list[tuple[str, str]] = []
    with RawConn(address) as c:
        c.handshake()
        c.send(driver_call(1, "GetId"))
        r = c.read_reply(1)
        outcome.append((r.msg.message_type.name, r.msg.error_name or ""))
        c.send(driver_call(2, "Hello"))
        try:
            r = c.read_reply(2, timeout=2)
            outcome.append((r.msg.message_type.name, r.msg.error_name or ""))
        except (EOFError, TimeoutError) as exc:
            outcome.append(("closed", type(exc).__name__))
    return outcome


def test_first_message_not_hello_as_on_the_bus(target: Target) -> None:
    """A first message other than Hello: the proxied client sees what the bus itself does."""
    direct = _not_hello_first(target.bus.address)
    proxied = _not_hello_first(target.address)
    assert direct[0] == ("ERROR", "org.freedesktop.DBus.Error.AccessDenied"), direct
    assert proxied == direct
    target.assert_healthy()


def test_half_a_message_then_disconnect(target: Target) -> None:
    pid = target.pid
    fds_before = target.settled_fd_count()
    for cut in (1, 15, 16, 40):
        with target.client() as c:
            c.send(driver_call(2, "GetId")[:cut])
    wait_for(lambda: fd_count(pid) <= fds_before, "the service's fds back to the baseline")
    target.assert_healthy()


def test_disconnect_mid_handshake_releases_everything(target: Target) -> None:
    """A client that leaves in the middle of the handshake owes nothing and is owed
    nothing: its session (client socket, bus socket, pidfd) goes at once."""
    pid = target.pid
    fds_before = target.settled_fd_count()
    opening = sasl_opening(fds=True)
    for cut in (0, 1, 5, 20, len(opening) - 8, len(opening) - 2):
        with target.connect() as c:
            if cut:
                c.send(opening[:cut])
    wait_for(lambda: fd_count(pid) <= fds_before, "the service's fds back to the baseline")
    target.assert_healthy()


def test_shutdown_read_side_while_replies_flow(target: Target, echo: RawPeer) -> None:
    """A client that stops reading for good (SHUT_RD) and keeps sending: no crash."""
    with target.client() as c:
        c.sock.shutdown(socket.SHUT_RD)
        for _ in range(200):
            try:
                c.send_call(ECHO, "/", "org.test.I", "Echo", "s", ["x" * 1000])
            except OSError:
                break
    target.assert_healthy()


@pytest.mark.parametrize("confined", [True, False], ids=["confined", "on-the-bus"])
def test_failing_calls_without_reply_do_not_flood_the_log(target: Target, confined: bool) -> None:
    """A call flagged NO_REPLY_EXPECTED that the service refuses is a client mistake, not a
    service error: no ERROR line, no traceback (else anyone can fill the journal with
    tracebacks, as fast as they can send)."""
    conn = target.client() if confined else target.manager
    try:
        for member, sig, args in [
            ("GetConnectionInfo", "s", ["org.nobody.Here"]),
            ("GetServerInfo", "o", ["/org/freedesktop/DBus/Containers1/c999"]),
            ("StopServer", "o", ["/org/freedesktop/DBus/Containers1/c999"]),
        ] * 10:
            conn.send(
                method_call(
                    conn.next_serial(),
                    MANAGER,
                    MANAGER_PATH,
                    MANAGER,
                    member,
                    sig,
                    args,
                    flags=NO_REPLY_EXPECTED,
                )
            )
        # A barrier through the service on the same connection, then let tasks finish.
        barrier = conn.call(
            MANAGER, MANAGER_PATH, MANAGER, "GetConnectionInfo", "s", ["org.nobody.Here"]
        ).msg
        assert barrier.message_type == MessageType.ERROR, barrier
        time.sleep(0.3)
        log = target.service.log()
        assert "Traceback" not in log, log[log.find("Traceback") - 300 :][:1500]
        assert " ERROR " not in log
    finally:
        if confined:
            conn.close()
    target.assert_healthy()


# -- spoofed replies through the header cache ------------------------------------------------


def _reply(serial: int, ay: bytes, reply_serial: int, dest: str) -> bytes:
    """A METHOD_RETURN with an unknown ``ay`` header field (code 42) before its reply serial."""
    return build_message(
        METHOD_RETURN,
        serial,
        [(42, "ay", ay), (F_REPLY_SERIAL, "u", reply_serial), (F_DESTINATION, "s", dest)],
    )


def test_filtered_client_cannot_forge_a_reply_serial(
    service: ServiceProcess, bus: PrivateBus
) -> None:
    """A filtered client may only answer calls a peer made to it (SPEC §4). Bytes that look
    like a reply-serial field inside an unknown header field must not make the filter read
    another reply serial than the one the bus will route by."""
    t = make_target(service, bus, FILTERED)
    victim = RawConn(bus.address).setup()
    try:
        assert victim.driver("RequestName", "su", [ECHO, 4]).body == [1]
        with t.client() as c:
            # The victim calls the client once (serial 7): the only reply the client owes.
            asked = victim.send_call(c.unique_name, "/", "org.test.I", "Ask")
            while True:
                call = c.read_message()
                assert call is not None
                if call.msg.member == "Ask":
                    break
            forged, pos = 4242, 104
            # 1. A reply whose reply-serial field sits at offset 104 (dropped: unexpected).
            c.send(_reply(c.next_serial(), b"a" * (pos - 28), 999, victim.unique_name))
            # 2. and 3. Replies to serial 4242, which the victim never sent the client;
            #    their unknown field holds 05 01 'u' 00 + a serial at offset 104.
            for fake in (1111, asked):
                ay = b"x" * (pos - 28) + b"\x05\x01u\x00" + struct.pack("<I", fake)
                c.send(_reply(c.next_serial(), ay, forged, victim.unique_name))
            assert c.driver("GetId").message_type == MessageType.METHOD_RETURN  # barrier
            # The client's honest answer to the call it did get.
            c.send(method_return(c.next_serial(), asked, victim.unique_name, "s", ["honest"]))
            got: list[Any] = []
            while True:
                try:
                    r = victim.read_message(1.0)
                except TimeoutError:
                    break
                if r is not None and r.msg.message_type == MessageType.METHOD_RETURN:
                    got.append((r.msg.reply_serial, r.msg.body))
            assert (forged, []) not in got, (
                f"a reply to serial {forged}, which the victim never sent the client, "
                f"passed the filter: {got}"
            )
            assert got == [(asked, ["honest"])], got
        t.assert_healthy()
    finally:
        victim.close()
        t.manager.close()
