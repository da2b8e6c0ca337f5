"""Service-backed mode: one AddServer per group on the session bus, then be the anchor.

No asyncio and no dbus-fast: the drop-in lives as long as its app, so it keeps
to a blocking handshake on one raw bus connection and a ``poll()`` loop that
answers the service's Connector requests (anchor/program.py ``answer``) and
watches the sync fd. The bus connection stays open so that the servers end
with this process (``StopOnDisconnect``). A Connector's EOF or a message on the
bus (the service's name lost its owner) is trouble for recovery.py.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import time
from collections.abc import Sequence

from xdg_containers.anchor.program import answer, connect_first
from xdg_containers.app.dropin.args import Group
from xdg_containers.app.dropin.identity import Identity
from xdg_containers.sasl.client import SaslClient
from xdg_containers.sasl.server import SaslError
from xdg_containers.wire.build import build_message, bus_call
from xdg_containers.wire.header import (
    ERROR,
    FIELD_DESTINATION,
    FIELD_INTERFACE,
    FIELD_MEMBER,
    FIELD_PATH,
    FIELD_SIGNATURE,
    FIELD_UNIX_FDS,
    METHOD_CALL,
    METHOD_RETURN,
    Header,
    MessageError,
    message_length,
    parse_header,
)
from xdg_containers.wire.types import BodyWriter, SignatureError, read_string

SERVICE = "org.freedesktop.DBus.Containers1"
SERVICE_PATH = "/org/freedesktop/DBus/Containers1"
EXT = "org.freedesktop.XdgContainers1."
_HELLO_SERIAL = 1
_MATCH_SERIAL = 2
_FIRST_ADD_SERIAL = 3
#: The one signal the bus sends us: the service's name lost its owner (it exited or
#: crashed; a hand-over passes the name straight to the new process, arg2 not empty).
#: With systemd's fd store holding the Connectors' other ends this is the only sign.
LOSS_MATCH = (
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    f"member='NameOwnerChanged',arg0='{SERVICE}',arg2=''"
)
#: ``run``'s answer when something needs a look: a Connector closed, or the bus spoke.
TROUBLE = -1

#: A named-argument value: (D-Bus signature, Python value).
Value = tuple[str, object]


class SetupError(Exception):
    """The service could not take the groups (the message says why)."""


# -- marshalling AddServer ------------------------------------------------------------


def _value(w: BodyWriter, sig: str, value: object) -> None:
    if sig in ("b", "h", "u"):
        assert isinstance(value, int)
        w.uint32(int(value))
    elif sig == "s":
        assert isinstance(value, str)
        w.string(value)
    elif sig in ("a{ss}", "a{sas}"):
        assert isinstance(value, dict)
        w.uint32(0)
        len_pos = len(w.buf) - 4
        w._align(8)
        start = len(w.buf)
        for key, item in value.items():
            w._align(8)
            w.string(key)
            if sig == "a{ss}":
                w.string(item)
            else:
                w.string_array(item)
        struct.pack_into("<I", w.buf, len_pos, len(w.buf) - start)
    else:  # pragma: no cover - only the signatures above are built
        raise ValueError(f"cannot marshal {sig!r}")


def _asv(w: BodyWriter, entries: dict[str, Value]) -> None:
    w.uint32(0)
    len_pos = len(w.buf) - 4
    w._align(8)
    start = len(w.buf)
    for key, (sig, value) in entries.items():
        w._align(8)
        w.string(key)
        w.signature(sig)
        _value(w, sig, value)
    struct.pack_into("<I", w.buf, len_pos, len(w.buf) - start)


def named_arguments(group: Group) -> dict[str, Value]:
    """AddServer's named arguments for a group (ListenFD is handle 0, Connector 1)."""
    named: dict[str, Value] = {
        "StopOnDisconnect": ("b", 1),
        EXT + "ListenFD": ("h", 0),
        EXT + "Connector": ("h", 1),
        EXT + "Bus": ("s", group.address),
    }
    if group.filter:
        # xdg-dbus-proxy ignores policy options without --filter; the service would
        # refuse them (a silent unfiltered proxy), so they are sent only with it.
        named[EXT + "Filter"] = ("b", 1)
        policy = group.policy()
        if policy:
            named[EXT + "Policy"] = ("a{ss}", policy)
        for flag, key in (("call", "Call"), ("broadcast", "Broadcast")):
            rules = group.rules(flag)
            if rules:
                named[EXT + key] = ("a{sas}", rules)
    if group.log:
        named[EXT + "Log"] = ("b", 1)
    return named


def add_server_message(serial: int, identity: Identity, group: Group) -> bytes:
    """The AddServer call (auto-start allowed) for one group, expecting two fds."""
    w = BodyWriter()
    w.string(identity.container_type)
    w.string(identity.app_id)
    w.string(identity.instance_id)
    _asv(w, {k: ("s", v) for k, v in identity.metadata.items()})
    _asv(w, named_arguments(group))
    fields: dict[int, str | int] = {
        FIELD_PATH: SERVICE_PATH,
        FIELD_INTERFACE: SERVICE,
        FIELD_MEMBER: "AddServer",
        FIELD_DESTINATION: SERVICE,
        FIELD_SIGNATURE: "sssa{sv}a{sv}",
        FIELD_UNIX_FDS: 2,
    }
    return build_message(METHOD_CALL, serial, fields, w.bytes())


# -- the handshake ------------------------------------------------------------------------


class _Reader:
    """Whole messages from a blocking socket with a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next_message(self) -> bytes | None:
        if len(self.buf) < 16:
            return None
        total = message_length(self.buf)
        if len(self.buf) < total:
            return None
        msg = bytes(self.buf[:total])
        del self.buf[:total]
        return msg


def _recv(sock: socket.socket, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise SetupError("no answer from the service in time")
    sock.settimeout(remaining)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        raise SetupError("no answer from the service in time") from None
    if not data:
        raise SetupError("the bus closed the connection")
    return data


def _error_text(msg: bytes, hdr: Header) -> str:
    name = hdr.error_name or "?"
    text = ""
    if hdr.signature and hdr.signature.startswith("s"):
        try:
            text = read_string(msg, hdr.body_offset, hdr.little_endian)[0]
        except SignatureError:
            pass
    return f"{name}: {text}" if text else name


class ServiceBacked:
    """The groups served by the Containers1 service, with this process as their anchor."""

    def __init__(self, bus_address: str, groups: Sequence[Group], identity: Identity) -> None:
        """Nothing happens until ``setup``."""
        self.bus_address = bus_address
        self.groups = list(groups)
        self.identity = identity
        self.bus: socket.socket | None = None
        self.connectors: list[socket.socket] = []
        self.server_paths: list[str] = []
        #: The unique name of the service that answered AddServer.
        self.service_name = ""

    def setup(self, listeners: Sequence[socket.socket], deadline: float) -> None:
        """AddServer for every group; SetupError (everything closed) if any fails."""
        try:
            self._setup(listeners, deadline)
        except (OSError, SaslError, MessageError, SignatureError, ValueError) as exc:
            self.close()
            raise SetupError(str(exc) or type(exc).__name__) from exc
        except SetupError:
            self.close()
            raise

    def _setup(self, listeners: Sequence[socket.socket], deadline: float) -> None:
        bus = connect_first(self.bus_address)
        self.bus = bus
        sasl = SaslClient(os.getuid())
        bus.settimeout(max(0.001, deadline - time.monotonic()))
        # AUTH, NEGOTIATE_UNIX_FD, BEGIN and Hello pipelined; the fd-carrying calls
        # wait for AGREE_UNIX_FD.
        bus.sendall(
            sasl.start()
            + sasl.begin(True)
            + bus_call(_HELLO_SERIAL, "Hello")
            + bus_call(_MATCH_SERIAL, "AddMatch", arg=LOSS_MATCH)
        )
        while not sasl.done:
            sasl.feed(_recv(bus, deadline))
        if not sasl.unix_fd_agreed:
            raise SetupError("the bus does not pass file descriptors")
        reader = _Reader(bus)
        reader.feed(sasl.leftover)
        pending: dict[int, int] = {_MATCH_SERIAL: -1}
        theirs: list[socket.socket] = []
        try:
            for i, (group, listener) in enumerate(zip(self.groups, listeners, strict=True)):
                mine, other = socket.socketpair(
                    socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
                )
                self.connectors.append(mine)
                theirs.append(other)
                serial = _FIRST_ADD_SERIAL + i
                data = add_server_message(serial, self.identity, group)
                fds = array.array("i", [listener.fileno(), other.fileno()])
                bus.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
                )
                pending[serial] = i
            self.server_paths = [""] * len(self.groups)
            while pending:
                msg = reader.next_message()
                if msg is None:
                    reader.feed(_recv(bus, deadline))
                    continue
                hdr = parse_header(msg)
                rs = hdr.reply_serial
                if rs is None or rs not in pending:
                    continue
                i = pending.pop(rs)
                what = "AddMatch" if i < 0 else "AddServer"
                if hdr.message_type == ERROR:
                    raise SetupError(f"{what}: {_error_text(msg, hdr)}")
                if i >= 0 and hdr.message_type == METHOD_RETURN and hdr.signature == "oa{sv}":
                    self.server_paths[i] = read_string(msg, hdr.body_offset, hdr.little_endian)[0]
                    self.service_name = hdr.sender or ""
        finally:
            for other in theirs:
                other.close()
        bus.setblocking(False)

    def run(self, sync_fd: int | None) -> int:
        """Answer Connector requests until the sync fd's reader goes away (0), or until
        a Connector closes or the bus sends something (TROUBLE: recovery.py looks)."""
        assert self.bus is not None
        poller = select.poll()
        if sync_fd is not None:
            poller.register(sync_fd, 0)  # POLLERR/POLLHUP are always reported
        by_fd = {c.fileno(): c for c in self.connectors}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        # Nothing is read here: what the bus sent stays for recovery.py to parse.
        poller.register(self.bus.fileno(), select.POLLIN)
        while True:
            for fd, _events in poller.poll():
                if fd == sync_fd:
                    return 0
                conn = by_fd.get(fd)
                if conn is None:
                    return TROUBLE
                try:
                    request = conn.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    return TROUBLE
                if not request:
                    return TROUBLE  # the EOF stays: recv says it again
                try:
                    answer(conn, request)
                except OSError:
                    return TROUBLE  # the service went away mid-request (a spare)

    def close(self) -> None:
        """Leave the bus and close the connectors (the servers end with them)."""
        for conn in self.connectors:
            conn.close()
        self.connectors = []
        if self.bus is not None:
            self.bus.close()
            self.bus = None

