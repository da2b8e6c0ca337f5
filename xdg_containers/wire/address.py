"""D-Bus server addresses: parse ``unix:path=...;tcp:host=...`` and open sockets to them."""

from __future__ import annotations

import asyncio
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


# -- which bus an address names ------------------------------------------------------------


def _entry_keys(entry: Address) -> set[tuple[object, ...]]:
    """What one entry connects to, in forms that do not depend on how it was spelled."""
    try:
        family, addr = entry.sockaddr()
    except AddressError:
        # A transport we cannot connect to: its parameters are all we can compare.
        params = tuple(sorted((k, v) for k, v in entry.params.items() if k != "guid"))
        return {("other", entry.transport, params)}
    if family == socket.AF_UNIX and isinstance(addr, bytes):
        return {("abstract", addr)}
    if family == socket.AF_UNIX and isinstance(addr, str):
        keys: set[tuple[object, ...]] = {("path", os.path.normpath(addr))}
        try:
            st = os.stat(addr)
        except OSError:
            pass
        else:
            # The socket file itself: equal through symlinks and ./.. spellings too.
            keys.add(("inode", st.st_dev, st.st_ino))
        return keys
    assert isinstance(addr, tuple)
    host, port = addr
    return {("tcp", host.lower(), port)}


def same_bus(a: str, b: str) -> bool:
    """Whether two address strings name the same bus, however each is spelled.

    Same bus: some entry of each reaches the same socket (path, abstract name or
    host and port, after unescaping; key order and ``guid=`` do not matter),
    and when both name a guid, a guid they share. Unparsable: string equality.
    """
    if a == b:
        return True
    try:
        ea, eb = parse_address(a), parse_address(b)
    except AddressError:
        return False
    guids_a = {e.params["guid"].lower() for e in ea if "guid" in e.params}
    guids_b = {e.params["guid"].lower() for e in eb if "guid" in e.params}
    if guids_a and guids_b and not guids_a & guids_b:
        return False
    keys_a: set[tuple[object, ...]] = set()
    for e in ea:
        keys_a |= _entry_keys(e)
    return any(_entry_keys(e) & keys_a for e in eb)


def _os_error_text(exc: OSError) -> str:
    """The errno's text (asyncio's for tcp is "Connect call failed (...)"), else the error's."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


async def probe_address(address: str, timeout: float) -> str | None:
    """Connect to each entry of ``address`` in turn (as a client would) and close again.

    None when one entry accepted a connection; else what went wrong with each,
    e.g. ``unix:path=/x: No such file or directory``.
    """
    loop = asyncio.get_running_loop()
    failures: list[str] = []
    for text, entry in zip(
        [t for t in address.split(";") if t], parse_address(address), strict=True
    ):
        try:
            family, addr = entry.sockaddr()
        except AddressError as exc:
            failures.append(f"{text}: {exc}")
            continue
        try:
            # (Inside the try: socket() itself fails where the family is not allowed,
            # e.g. EAFNOSUPPORT for tcp under the unit's RestrictAddressFamilies=AF_UNIX.)
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            failures.append(f"{text}: {_os_error_text(exc)}")
            continue
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
            return None
        except TimeoutError:
            failures.append(f"{text}: no answer within {timeout:g} s")
        except OSError as exc:
            failures.append(f"{text}: {_os_error_text(exc)}")
        finally:
            sock.close()
    return "; ".join(failures)
