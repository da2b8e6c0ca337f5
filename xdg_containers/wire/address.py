"""D-Bus server addresses: parse ``unix:path=...;tcp:host=...`` and open sockets to them."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class AddressError(ValueError):
    """An address string we cannot parse or connect to."""


@dataclass(frozen=True)
class Address:
    """One transport entry of a D-Bus address."""

    transport: str
    params: dict[str, str]

    def sockaddr(self) -> tuple[int, str | bytes | tuple[str, int]]:
        """Socket family and address to connect to."""
        if self.transport == "unix":
            if "path" in self.params:
                return socket.AF_UNIX, self.params["path"]
            if "abstract" in self.params:
                return socket.AF_UNIX, b"\0" + os.fsencode(self.params["abstract"])
            raise AddressError("unix address needs path= or abstract=")
        if self.transport == "tcp":
            host = self.params.get("host", "localhost")
            try:
                port = int(self.params.get("port", ""))
            except ValueError as exc:
                raise AddressError("tcp address needs a numeric port=") from exc
            return socket.AF_INET, (host, port)
        raise AddressError(f"unsupported transport {self.transport!r}")


def parse_address(text: str) -> list[Address]:
    """Split an address string into its entries, unescaping values."""
    out: list[Address] = []
    for entry in text.split(";"):
        if not entry:
            continue
        transport, sep, rest = entry.partition(":")
        if not sep or not transport:
            raise AddressError(f"address entry {entry!r} has no transport")
        params: dict[str, str] = {}
        for kv in rest.split(","):
            if not kv:
                continue
            key, eq, value = kv.partition("=")
            if not eq:
                raise AddressError(f"address parameter {kv!r} has no '='")
            if _BAD_ESCAPE.search(value):
                raise AddressError(f"address value {value!r} has a malformed %-escape")
            params[key] = unquote_to_bytes(value).decode("utf-8", "surrogateescape")
        out.append(Address(transport, params))
    if not out:
        raise AddressError("empty address")
    return out


def escape_value(value: str) -> str:
    """Escape a value for use in an address string (as libdbus does)."""
    safe = set(b"-_/.\\*0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return "".join(chr(b) if b in safe else f"%{b:02x}" for b in os.fsencode(value))


def session_bus_address() -> str | None:
    """The session bus address from the environment or the usual socket, if any."""
    addr = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if addr:
        return addr
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        path = os.path.join(runtime, "bus")
        if os.path.exists(path):
            return "unix:path=" + escape_value(path)
    return None


def system_bus_address() -> str:
    """The system bus address (environment override or the well-known path)."""
    return os.environ.get(
        "DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/var/run/dbus/system_bus_socket"
    )
