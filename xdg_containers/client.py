"""A small dbus-fast client for the command line: connect, call the service, map errors.

The admin views and the launcher share it. Failures become :class:`ClientError`
carrying the message to print and the exit code to return.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from .compat.dbusfast import connect_bus
from .wire.address import session_bus_address, system_bus_address

NAME = "org.freedesktop.DBus.Containers1"
PATH = "/org/freedesktop/DBus/Containers1"
INTERFACE = "org.freedesktop.DBus.Containers1"
SERVER_INTERFACE = "org.freedesktop.DBus.Containers1.Server"
PROPERTIES = "org.freedesktop.DBus.Properties"
BUS_DRIVER = "org.freedesktop.DBus"
ERROR_PREFIX = "org.freedesktop.DBus.Error."

#: Exit codes of the admin commands (``run`` returns its command's status instead).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_NO_BUS = 4

NOT_RUNNING = "xdg-containers is not running on this bus"

_OBJECT_PATH = re.compile(r"^/$|^(/[A-Za-z0-9_]+)+$")


class ClientError(Exception):
    """A failure to report to the user: ``str(exc)`` is the message, ``exit_code`` the status."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        """``message`` is printed after ``xdg-containers: ``."""
        super().__init__(message)
        self.exit_code = exit_code


class CallError(Exception):
    """A D-Bus error reply: its name, text, and whether the bus itself sent it."""

    def __init__(self, name: str, text: str, from_bus: bool) -> None:
        """``from_bus`` is true when the sender was ``org.freedesktop.DBus``."""
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text
        self.from_bus = from_bus

    @property
    def short_name(self) -> str:
        """The error name without the ``org.freedesktop.DBus.Error.`` prefix."""
        return self.name.removeprefix(ERROR_PREFIX)

    def service_missing(self) -> bool:
        """True when the bus says nobody owns (or can start) the service's name."""
        return self.from_bus and self.short_name in ("ServiceUnknown", "NameHasNoOwner")


#: What to do without a session bus, for the admin views (which have bus flags).
NO_BUS_HINT = "use --address ADDR for another bus, or --system"


def choose_address(
    session: bool = False,
    system: bool = False,
    address: str | None = None,
    no_bus_hint: str = NO_BUS_HINT,
) -> str:
    """The address for ``--session`` (default), ``--system`` or ``--address ADDR``.

    ``no_bus_hint`` says what to do when there is no session bus; each command
    names only its own options there."""
    if address:
        return address
    if system:
        return system_bus_address()
    found = session_bus_address()
    if found is None:
        raise ClientError(
            "no session bus: DBUS_SESSION_BUS_ADDRESS is unset and $XDG_RUNTIME_DIR/bus "
            f"does not exist; {no_bus_hint}",
            EXIT_NO_BUS,
        )
    return found


async def connect(address: str) -> MessageBus:
    """Connect to the bus at ``address`` with fd passing; ClientError if that fails."""
    try:
        return await asyncio.wait_for(
            connect_bus(address, negotiate_unix_fd=True), 30
        )
    except Exception as exc:
        detail = str(exc) or type(exc).__name__
        raise ClientError(
            f"cannot connect to the bus at {address}: {detail} (is a bus running there, "
            "and is the address right?)",
            EXIT_NO_BUS,
        ) from exc


async def call(
    bus: MessageBus,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    *,
    path: str = PATH,
    interface: str = INTERFACE,
    destination: str = NAME,
    auto_start: bool = False,
    unix_fds: list[int] | None = None,
    timeout: float = 60.0,
) -> Message:
    """Call a method and return the reply; raise CallError for an error reply.

    ``auto_start`` false sets NO_AUTO_START, so asking does not start the service."""
    flags = MessageFlag.NONE if auto_start else MessageFlag.NO_AUTOSTART
    msg = Message(destination=destination, path=path, interface=interface, member=member,
                  signature=signature, body=body or [], flags=flags, unix_fds=unix_fds or [])
    try:
        reply = await asyncio.wait_for(bus.call(msg), timeout)
    except TimeoutError as exc:
        raise ClientError(
            f"{destination} did not answer {interface}.{member} within {timeout:g} s; "
            "the service may be stuck: its log (journalctl --user -u xdg-containers) says more"
        ) from exc
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        text = str(reply.body[0]) if reply.body and isinstance(reply.body[0], str) else ""
        raise CallError(reply.error_name or "", text, reply.sender == BUS_DRIVER)
    return reply


async def get_all(bus: MessageBus, path: str) -> dict[str, Any]:
    """Every property of the server object at ``path``, unwrapped."""
    reply = await call(bus, "GetAll", "s", [SERVER_INTERFACE], path=path, interface=PROPERTIES)
    props: dict[str, Variant] = reply.body[0]
    return {key: var.value for key, var in props.items()}


def server_path(text: str) -> str:
    """A server path from the command line; ``c3`` is short for the full path."""
    if re.fullmatch(r"c[0-9]+", text):
        return f"{PATH}/{text}"
    if not _OBJECT_PATH.match(text):
        raise ClientError(
            f"{text!r} is not a D-Bus object path: give a server's path "
            "(/org/freedesktop/DBus/Containers1/cN) or just cN",
            EXIT_USAGE,
        )
    return text


def bytestring(value: Any) -> str:
    """An ``ay`` string property (path or label) as text, without its trailing NUL."""
    if isinstance(value, bytes | bytearray):
        return os.fsdecode(bytes(value).rstrip(b"\0"))
    return str(value)


def plain(value: Any) -> Any:
    """A D-Bus value as JSON-ready data: variants unwrapped, other bytes as lists of ints."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return list(bytes(value))
    return value


def show(value: Any) -> str:
    """A D-Bus value as short human-readable text."""
    if isinstance(value, Variant):
        if value.signature == "ay":
            return repr(bytes(value.value))
        return show(value.value)
    if isinstance(value, bytes | bytearray):
        return repr(bytes(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def pidfd_pid(fd: int) -> int | None:
    """The pid a pidfd refers to, from ``/proc/self/fdinfo`` (-1: the process is gone)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None
