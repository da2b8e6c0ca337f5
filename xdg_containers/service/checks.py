"""AddServer's checks of what it was handed: fds (handles), sockets, metadata size, the bus."""

from __future__ import annotations

import os
import socket
from typing import Any

from dbus_fast import Message, SignatureTree

from .. import errors
from ..servers.arguments import CONNECTOR, LISTEN_FD
from ..wire.address import (
    AddressError,
    parse_address,
    probe_address,
    same_bus,
    session_bus_address,
    system_bus_address,
)

BUS_ARGUMENT = "org.freedesktop.XdgContainers1.Bus"
#: How long AddServer waits for an entry of a ``Bus`` address to accept a connection.
BUS_PROBE_TIMEOUT = 2.0

_FIXED_SIZES = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4}


def _alignment(token: str) -> int:
    if token in _FIXED_SIZES:
        return _FIXED_SIZES[token]
    return {"s": 4, "o": 4, "a": 4, "g": 1, "v": 1}.get(token, 8)  # ( and {: 8


def _marshalled_end(t: Any, value: Any, pos: int) -> int:
    """Where marshalling ``value`` of SignatureType ``t`` at offset ``pos`` ends."""
    token = t.token
    if token in _FIXED_SIZES:
        size = _FIXED_SIZES[token]
        return -(-pos // size) * size + size
    if token in "so":
        return -(-pos // 4) * 4 + 4 + len(value.encode()) + 1
    if token == "g":
        return pos + 1 + len(value.encode()) + 1
    if token == "v":
        pos += 1 + len(value.signature.encode()) + 1
        return _marshalled_end(value.type, value.value, pos)
    if token == "a":
        pos = -(-pos // 4) * 4 + 4
        child = t.children[0]
        align = _alignment(child.token)
        pos = -(-pos // align) * align
        if child.token == "y":
            return pos + len(value)
        if child.token == "{":
            key_t, value_t = child.children
            for k, v in value.items():
                pos = _marshalled_end(value_t, v, _marshalled_end(key_t, k, -(-pos // 8) * 8))
            return pos
        for item in value:
            pos = _marshalled_end(child, item, pos)
        return pos
    pos = -(-pos // 8) * 8  # a struct
    for child, item in zip(t.children, value, strict=True):
        pos = _marshalled_end(child, item, pos)
    return pos


def metadata_size(container_type: str, app_id: str, instance_id: str, md: dict[str, Any]) -> int:
    """What AddServer's limit counts: the marshalled a{sv} plus the three strings' bytes."""
    body = _marshalled_end(SignatureTree("a{sv}").types[0], md, 0)
    return body + sum(len(s.encode()) for s in (container_type, app_id, instance_id))


def attached_fd(msg: Message, handle: object, key: str) -> int:
    """Our own dup of the fd that handle argument ``key`` indexes in ``msg``'s attached fds.

    Every handle argument goes through here: a handle is an index into the fds
    that came with *this* message, never one of the service's own fd numbers
    (dbus-fast leaves the bare index in the body when no fd came with it).
    """
    fds = msg.unix_fds or []
    if type(handle) is not int or not 0 <= handle < len(fds):
        raise errors.invalid_args(
            f"named argument {key}: handle {handle} does not index a file descriptor "
            f"attached to this message ({len(fds)} attached)"
        )
    try:
        return os.dup(fds[handle])
    except OSError as exc:
        raise errors.invalid_args(
            f"named argument {key}: the file descriptor of handle {handle} is unusable: "
            f"{exc.strerror}"
        ) from exc


def _socket_kind(fd: int, key: str) -> tuple[int, int, bool]:
    """(family, type, listening) of a socket we were handed; InvalidArgs if it is none."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise errors.invalid_args(f"{key} is not a socket: {exc.strerror}") from exc
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        return sock.family, kind, listening
    except OSError as exc:
        raise errors.invalid_args(f"{key}: cannot inspect the socket: {exc.strerror}") from exc
    finally:
        sock.close()


def check_connector(fd: int) -> None:
    """The anchor's socket (SPEC 10) must be a unix SOCK_SEQPACKET socket."""
    family, kind, _listening = _socket_kind(fd, CONNECTOR)
    if family != socket.AF_UNIX or kind != socket.SOCK_SEQPACKET:
        raise errors.invalid_args(
            f"{CONNECTOR} must be a connected unix SOCK_SEQPACKET socket"
        )
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.getpeername()  # a socketpair end answers ''; an unconnected one ENOTCONN
    except OSError as exc:
        raise errors.invalid_args(
            f"{CONNECTOR} must be a connected unix SOCK_SEQPACKET socket: {exc.strerror}"
        ) from exc


def check_listen_fd(fd: int) -> socket.socket:
    """Wrap a launcher's fd; it must be a listening unix stream socket."""
    family, kind, listening = _socket_kind(fd, LISTEN_FD)
    if family != socket.AF_UNIX or kind != socket.SOCK_STREAM or not listening:
        raise errors.invalid_args(f"{LISTEN_FD} must be a listening unix SOCK_STREAM socket")
    return socket.socket(fileno=os.dup(fd))


async def upstream_address(bus: str, service_bus_address: str) -> str:
    """The address a server's connections go to; one nobody listens on is refused
    here, not with a reset for every client later."""
    if bus == "":
        return service_bus_address
    if bus == "session":
        addr = session_bus_address()
        if addr is None:
            raise errors.invalid_args(f"{BUS_ARGUMENT}: no session bus address is known")
    elif bus == "system":
        addr = system_bus_address()
    else:
        addr = bus
    try:
        entries = parse_address(addr)
        for e in entries:
            e.sockaddr()
    except AddressError as exc:
        raise errors.invalid_args(
            f"{BUS_ARGUMENT}: {addr!r} is not a usable address: {exc}"
        ) from exc
    if not same_bus(addr, service_bus_address):
        problem = await probe_address(addr, BUS_PROBE_TIMEOUT)
        if problem is not None:
            raise errors.invalid_args(
                f"{BUS_ARGUMENT}: nobody listens on {addr!r} ({problem})"
            )
    return addr

