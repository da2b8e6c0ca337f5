"""A session core (xdg_containers/core/) on recording fakes: no socket, no loop.

``Harness`` gives the core two ports that record what it asks for (bytes toward each
side, reading paused or resumed, closing) and a host that records its callbacks; the
core's I/O hooks record too. The tests of test_core_table.py and test_core_props.py
drive it; the checks below keep the harness itself honest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xdg_containers.config import Limits
from xdg_containers.core.basic_filter import BasicFilter
from xdg_containers.core.budget import BufferBudget
from xdg_containers.core.phase import Phase
from xdg_containers.core.ports import MessageFilter
from xdg_containers.core.session import SessionCore
from xdg_containers.wire import header as wh
from xdg_containers.wire.build import build_message, method_return
from xdg_containers.wire.types import BodyWriter

UID = 1000
BUS_UID = 0
GUID = "0123456789abcdef0123456789abcdef"
BUS = "org.freedesktop.DBus"
UNIQUE = ":1.42"
PEER = ":1.7"
CLIENT_AUTH = b"\0AUTH EXTERNAL " + str(UID).encode().hex().encode() + b"\r\n"
CLIENT_BEGIN = b"BEGIN\r\n"
CLIENT_FD_BEGIN = b"NEGOTIATE_UNIX_FD\r\nBEGIN\r\n"
BUS_OK = b"OK " + GUID.encode() + b"\r\n"
BUS_OK_FDS = BUS_OK + b"AGREE_UNIX_FD\r\n"

Action = tuple[Any, ...]


def call(serial: int, member: str, dest: str = PEER, fds: int = 0, body: str = "") -> bytes:
    """A method call from the client (``body``: one string argument if not empty)."""
    fields: dict[int, str | int] = {
        wh.FIELD_PATH: "/", wh.FIELD_MEMBER: member, wh.FIELD_DESTINATION: dest,
        wh.FIELD_INTERFACE: "org.example.Echo",
    }
    payload = b""
    if body:
        w = BodyWriter()
        w.string(body)
        payload = w.bytes()
        fields[wh.FIELD_SIGNATURE] = "s"
    if fds:
        fields[wh.FIELD_UNIX_FDS] = fds
    if dest == BUS:
        fields[wh.FIELD_INTERFACE] = BUS
        fields[wh.FIELD_PATH] = "/org/freedesktop/DBus"
    return build_message(wh.METHOD_CALL, serial, fields, payload)


def hello(serial: int = 1) -> bytes:
    """The client's Hello."""
    return call(serial, "Hello", BUS)


def hello_reply(reply_serial: int = 1, name: str = UNIQUE) -> bytes:
    """The bus's answer to the Hello: the client's unique name."""
    w = BodyWriter()
    w.string(name)
    return method_return(1, reply_serial, BUS, name, "s", w.bytes())


def reply(reply_serial: int, sender: str = PEER, serial: int = 5) -> bytes:
    """A peer's empty method return to the client."""
    return method_return(serial, reply_serial, sender, UNIQUE, "", b"")


class FakePort:
    """A port that records; its peer reads everything at once unless ``stuck``."""

    def __init__(self, name: str, actions: list[Action]) -> None:
        self.name = name
        self.actions = actions
        self.eof = False
        self.closed = False
        self.pending_bytes = 0
        self.pending_fds = 0
        self.into: memoryview | None = None
        self.on_written: Callable[[], None] | None = None
        self.on_drained: Callable[[], None] | None = None
        self.receive_fds = False
        self.fault: BaseException | None = None
        self.stuck = False  # the peer does not read: what is queued stays
        self._reading = False
        self.written = bytearray()  # everything the peer got, in order
        self.fds_written: list[int] = []
        self._queued: list[tuple[bytes, list[int] | None]] = []

    @property
    def reading(self) -> bool:
        return self._reading

    @property
    def write_idle(self) -> bool:
        return not self._queued

    def queue(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        if self.closed:
            return
        self._queued.append((bytes(data), fds))
        self.pending_bytes += len(data)
        self.pending_fds += len(fds or ())

    def send(self, data: bytes | memoryview) -> None:
        self.queue(data)
        self.flush()

    def flush(self) -> None:
        if self.closed or self.stuck or not self._queued:
            return
        for data, fds in self._queued:
            self.written += data
            self.fds_written += fds or ()
            self.actions.append((f"to_{self.name}", data, tuple(fds or ())))
        self._queued.clear()
        self.pending_bytes = self.pending_fds = 0
        if self.on_written is not None:
            self.on_written()
        if self.on_drained is not None:
            self.on_drained()

    def unstick(self) -> None:
        """The peer reads again."""
        self.stuck = False
        self.flush()

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.actions.append((f"pause_{self.name}",))

    def start_reading(self) -> None:
        if not self._reading and not self.closed:
            self._reading = True
            self.actions.append((f"read_{self.name}",))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queued.clear()
            self.pending_bytes = self.pending_fds = 0
            self.actions.append((f"close_{self.name}",))


class FakeSpec:
    log_messages = False


class FakeHost:
    """A server as the core sees it, recording its callbacks."""

    def __init__(
        self, actions: list[Action], limits: Limits, make: Callable[[], MessageFilter]
    ) -> None:
        self.actions = actions
        self.path = "/org/freedesktop/DBus/Containers1/c0"
        self.guid = GUID
        self.limits = limits
        self.messages_forwarded = 0
        self.budget = BufferBudget(limits.max_buffered_bytes)
        self.spec = FakeSpec()
        self.partials: set[Any] = set()
        self.log_messages = False
        self.service_names: frozenset[str] = frozenset({":1.1"})
        self.denied = 0
        self._make = make

    def make_filter(self, session: Any) -> MessageFilter:
        return self._make()

    def handshake_started(self, session: Any) -> None:
        self.actions.append(("handshake_started",))

    def handshake_done(self, session: Any) -> None:
        self.actions.append(("handshake_done",))

    def session_named(self, session: Any) -> None:
        self.actions.append(("named", session.unique_name))

    def session_closed(self, session: Any) -> None:
        self.actions.append(("closed",))

    def count_denied(self) -> None:
        self.denied += 1

    def log_denial(self, session: Any, direction: str, hdr: Any, verdict: str, reason: str) -> None:
        self.actions.append(("denied", direction, verdict))


class FakeCreds:
    uid = UID
    pid = 4242
    completed = False

    def complete(self) -> None:
        self.completed = True

    def close(self) -> None:
        pass


class HarnessSession(SessionCore):
    """The core with its I/O hooks recording instead of doing."""

    __slots__ = ("actions", "connecting", "unread")

    def _stop_io(self) -> None:
        self.actions.append(("stop_io",))

    def _ended(self) -> None:
        pass

    def _start_grace(self) -> None:
        self.actions.append(("grace_timer",))

    def _client_unread(self) -> bool:
        return self.unread

    def _complete_creds(self) -> None:
        assert isinstance(self.creds, FakeCreds)
        self.creds.complete()

    def _reconnect(self) -> None:
        self.actions.append(("reconnect",))

    def _bus_on_its_way(self) -> bool:
        return self.connecting


class Harness:
    """One session core with fake ports; ``take()`` returns the actions since last time."""

    def __init__(
        self,
        limits: Limits | None = None,
        make_filter: Callable[[], MessageFilter] | None = None,
    ) -> None:
        self.actions: list[Action] = []
        self.limits = limits or Limits()
        self.host = FakeHost(
            self.actions, self.limits, make_filter or (lambda: BasicFilter(frozenset({":1.1"})))
        )
        self.client = FakePort("client", self.actions)
        self.bus = FakePort("bus", self.actions)
        s = HarnessSession.__new__(HarnessSession)
        s.actions = self.actions
        s.connecting = False
        s.unread = False
        SessionCore.__init__(s, self.host, FakeCreds(), self.client, BUS_UID)
        self.core = s
        self.client.start_reading()

    def take(self) -> list[Action]:
        """The actions recorded since the last call."""
        out = list(self.actions)
        self.actions.clear()
        return out

    # -- events --------------------------------------------------------------------------

    def attach_bus(self) -> None:
        self.core._bus_attached(self.bus)

    def from_client(self, data: bytes, fds: list[int] | None = None) -> None:
        self.core._client_data(data, fds or [])

    def from_bus(self, data: bytes, fds: list[int] | None = None) -> None:
        self.core._bus_data(data, fds or [])

    def client_eof(self) -> None:
        self.client.eof = True
        self.client.pause_reading()
        self.core._client_eof()

    def bus_eof(self) -> None:
        self.bus.eof = True
        self.bus.pause_reading()
        self.core._bus_eof()

    # -- getting somewhere -----------------------------------------------------------------

    def to_running(self) -> None:
        """Authenticated, named: the client's calls flow."""
        self.attach_bus()
        self.from_client(CLIENT_AUTH + CLIENT_BEGIN + hello())
        self.from_bus(BUS_OK + hello_reply())
        assert self.core.state is Phase.RUNNING, self.core.state


def messages(stream: bytes | bytearray) -> list[bytes]:
    """Split a byte stream of whole messages (after any handshake lines)."""
    out = []
    pos = 0
    while pos < len(stream):
        size = wh.message_length(stream, pos)  # raises MessageError on garbage
        wh.parse_header(bytes(stream[pos : pos + size]))
        out.append(bytes(stream[pos : pos + size]))
        pos += size
    return out


def test_the_harness_runs_a_session_to_running() -> None:
    h = Harness()
    h.to_running()
    got = h.take()
    assert ("named", UNIQUE) in got
    # The bus got our AUTH, BEGIN and the Hello; the client our OK and its name.
    assert h.bus.written.startswith(b"\0AUTH EXTERNAL ")
    assert h.client.written.startswith(b"OK " + GUID.encode())
    assert h.client.written.endswith(hello_reply())


def test_messages_splits_and_refuses_garbage() -> None:
    assert messages(hello() + reply(1)) == [hello(), reply(1)]
    try:
        messages(b"garbage garbage garbage!")
    except wh.MessageError:
        return
    raise AssertionError("garbage parsed")
