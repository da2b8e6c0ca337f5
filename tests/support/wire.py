"""The one raw D-Bus marshaller of the tests and benchmarks, and dbus-fast's reading of it.

Hostile clients must be able to say things no library lets them say: a header that lies
about its length, fds the header does not declare, big-endian messages, unknown header
fields, serials near 2^32; dbus-fast's public Message cannot, and the product's
``wire.build`` writes only what the proxy sends. So this module marshals messages itself
(both endiannesses, any header field, any body); tests/integration/test_hostile_wire.py and
tests/unit/test_header.py check it against dbus-fast. What arrives is decoded with
dbus-fast's unmarshaller, so the tests never judge the service with its own parser.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Message

from tests.support.dbusfast import unmarshaller
from tests.support.names import DRIVER, DRIVER_PATH
from tests.support.processes import close_all

# Message types and header field codes (D-Bus specification).
METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
F_PATH, F_INTERFACE, F_MEMBER, F_ERROR_NAME = 1, 2, 3, 4
F_REPLY_SERIAL, F_DESTINATION, F_SENDER, F_SIGNATURE, F_UNIX_FDS = 5, 6, 7, 8, 9
NO_REPLY_EXPECTED = 0x1
NO_AUTO_START = 0x2


_ALIGN = {
    "y": 1,
    "g": 1,
    "v": 1,
    "n": 2,
    "q": 2,
    "b": 4,
    "i": 4,
    "u": 4,
    "h": 4,
    "s": 4,
    "o": 4,
    "a": 4,
    "x": 8,
    "t": 8,
    "d": 8,
    "(": 8,
    "{": 8,
}
_FIXED = {"n": "h", "q": "H", "b": "I", "i": "i", "u": "I", "h": "I", "x": "q", "t": "Q", "d": "d"}


# ----------------------------------------------------------------------------------------
# marshalling


def complete_types(sig: str) -> list[str]:
    """Split a signature into its complete types."""
    out: list[str] = []
    i = 0
    while i < len(sig):
        j = _type_end(sig, i)
        out.append(sig[i:j])
        i = j
    return out


def _type_end(sig: str, i: int) -> int:
    c = sig[i]
    if c == "a":
        return _type_end(sig, i + 1)
    if c in "({":
        close = ")" if c == "(" else "}"
        j = i + 1
        while sig[j] != close:
            j = _type_end(sig, j)
        return j + 1
    return i + 1


class _Writer:
    def __init__(self, little: bool, base: int = 0) -> None:
        self.b = bytearray()
        self.e = "<" if little else ">"
        self.base = base  # the absolute offset of b[0]: alignment counts from the message start

    def align(self, n: int) -> None:
        self.b += b"\0" * (-(self.base + len(self.b)) % n)

    def value(self, t: str, v: Any) -> None:
        c = t[0]
        if c == "y":
            self.b.append(int(v) & 0xFF)
        elif c in _FIXED:
            self.align(_ALIGN[c])
            self.b += struct.pack(self.e + _FIXED[c], v)
        elif c in "so":
            raw = v.encode() if isinstance(v, str) else bytes(v)
            self.align(4)
            self.b += struct.pack(self.e + "I", len(raw)) + raw + b"\0"
        elif c == "g":
            raw = v.encode() if isinstance(v, str) else bytes(v)
            self.b += bytes([len(raw) & 0xFF]) + raw + b"\0"
        elif c == "v":
            vsig, vv = v
            self.value("g", vsig)
            self.value(vsig, vv)
        elif c == "a":
            elem = t[1:]
            self.align(4)
            at = len(self.b)
            self.b += b"\0\0\0\0"
            self.align(_ALIGN[elem[0]])
            start = len(self.b)
            if elem == "y" and isinstance(v, bytes | bytearray | memoryview):
                self.b += v
            else:
                for item in v.items() if isinstance(v, dict) else v:
                    self.value(elem, item)
            self.b[at : at + 4] = struct.pack(self.e + "I", len(self.b) - start)
        elif c in "({":
            self.align(8)
            for sub, item in zip(complete_types(t[1:-1]), v, strict=True):
                self.value(sub, item)
        else:
            raise ValueError(f"cannot marshal type {t!r}")


def marshal(sig: str, values: Sequence[Any], little: bool = True, base: int = 0) -> bytes:
    """Marshal ``values`` (one per complete type of ``sig``) as data starting at offset ``base``.

    Arrays are lists (dicts for ``a{..}``), structs tuples, variants ``(signature, value)``.
    """
    w = _Writer(little, base)
    for t, v in zip(complete_types(sig), values, strict=True):
        w.value(t, v)
    return bytes(w.b)


def build_message(
    mtype: int,
    serial: int,
    fields: Iterable[tuple[int, str, Any]],
    body: bytes = b"",
    *,
    flags: int = 0,
    little: bool = True,
    body_length: int | None = None,
    version: int = 1,
) -> bytes:
    """A whole message from raw header fields ``(code, signature, value)`` and body bytes.

    ``body_length`` overrides the length the fixed header claims (to lie about it).
    """
    w = _Writer(little)
    w.b += bytes([0x6C if little else 0x42, mtype, flags, version])
    w.b += struct.pack(w.e + "II", len(body) if body_length is None else body_length, serial)
    w.value("a(yv)", [(code, (sig, value)) for code, sig, value in fields])
    w.align(8)
    return bytes(w.b) + body


def _routing(
    path: str | None = None,
    interface: str | None = None,
    member: str | None = None,
    destination: str | None = None,
    sig: str = "",
    unix_fds: int = 0,
) -> list[tuple[int, str, Any]]:
    fields: list[tuple[int, str, Any]] = []
    if path is not None:
        fields.append((F_PATH, "o", path))
    if interface is not None:
        fields.append((F_INTERFACE, "s", interface))
    if member is not None:
        fields.append((F_MEMBER, "s", member))
    if destination is not None:
        fields.append((F_DESTINATION, "s", destination))
    if sig:
        fields.append((F_SIGNATURE, "g", sig))
    if unix_fds:
        fields.append((F_UNIX_FDS, "u", unix_fds))
    return fields


def method_call(
    serial: int,
    destination: str | None,
    path: str,
    interface: str | None,
    member: str,
    sig: str = "",
    args: Sequence[Any] = (),
    *,
    flags: int = 0,
    little: bool = True,
    unix_fds: int = 0,
    extra: Sequence[tuple[int, str, Any]] = (),
) -> bytes:
    """A METHOD_CALL; ``extra`` header fields (any code) follow the routing ones."""
    body = marshal(sig, args, little) if sig else b""
    fields = _routing(path, interface, member, destination, sig, unix_fds) + list(extra)
    return build_message(METHOD_CALL, serial, fields, body, flags=flags, little=little)


def driver_call(
    serial: int, member: str, sig: str = "", args: Sequence[Any] = (), **kw: Any
) -> bytes:
    """A call to the bus driver."""
    return method_call(serial, DRIVER, DRIVER_PATH, DRIVER, member, sig, args, **kw)


def signal(
    serial: int,
    path: str,
    interface: str,
    member: str,
    sig: str = "",
    args: Sequence[Any] = (),
    *,
    destination: str | None = None,
    little: bool = True,
) -> bytes:
    """A SIGNAL (broadcast unless ``destination``)."""
    body = marshal(sig, args, little) if sig else b""
    fields = _routing(path, interface, member, destination, sig)
    return build_message(SIGNAL, serial, fields, body, little=little)


def method_return(
    serial: int,
    reply_serial: int,
    destination: str | None,
    sig: str = "",
    args: Sequence[Any] = (),
    *,
    body: bytes | None = None,
    little: bool = True,
) -> bytes:
    """A METHOD_RETURN (``body`` given as bytes wins over ``sig``/``args`` marshalling)."""
    if body is None:
        body = marshal(sig, args, little) if sig else b""
    fields: list[tuple[int, str, Any]] = [(F_REPLY_SERIAL, "u", reply_serial)]
    if destination is not None:
        fields.append((F_DESTINATION, "s", destination))
    if sig:
        fields.append((F_SIGNATURE, "g", sig))
    return build_message(METHOD_RETURN, serial, fields, body, little=little)


def error_message(
    serial: int, reply_serial: int, destination: str | None, name: str, text: str = ""
) -> bytes:
    """An ERROR reply."""
    fields: list[tuple[int, str, Any]] = [
        (F_ERROR_NAME, "s", name),
        (F_REPLY_SERIAL, "u", reply_serial),
    ]
    if destination is not None:
        fields.append((F_DESTINATION, "s", destination))
    fields.append((F_SIGNATURE, "g", "s"))
    return build_message(ERROR, serial, fields, marshal("s", [text]))


def wire_length(buf: bytes | bytearray, pos: int = 0) -> int:
    """Total length of the message at ``pos`` from its fixed header (our own reading)."""
    e = "<" if buf[pos] == 0x6C else ">"
    body_len, _serial, fields_len = struct.unpack_from(e + "III", buf, pos + 4)
    end = 16 + fields_len
    return int(end + (-end % 8) + body_len)


# ----------------------------------------------------------------------------------------
# decoding


class Undecodable(ValueError):
    """A whole message arrived that dbus-fast cannot read (it has been consumed)."""

    def __init__(self, raw: bytes) -> None:
        super().__init__(f"undecodable message {raw[:48]!r}...")
        self.raw = raw


@dataclass
class Received:
    """One message read off a socket: raw bytes, dbus-fast's decoding, the fds that came."""

    raw: bytes
    msg: Message
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        """Close the fds that arrived with the message."""
        close_all(self.fds)
        self.fds = []


def decode(raw: bytes) -> Message:
    """dbus-fast's reading of one whole message."""
    msg = unmarshaller(io.BytesIO(raw)).unmarshall()
    assert msg is not None, "incomplete message"
    return msg


def unix_path(address: str) -> str:
    """The socket path of a ``unix:path=...`` address (or a path as is)."""
    if "path=" not in address:
        return address
    return address.split("path=", 1)[1].split(",", 1)[0]


def declared_fds(raw: bytes) -> int:
    """The UNIX_FDS header field, read by hand (dbus-fast keeps fds, not the count)."""
    e = "<" if raw[0] == 0x6C else ">"
    fields_len = struct.unpack_from(e + "I", raw, 12)[0]
    pos, end = 16, 16 + fields_len
    while pos < end:
        pos += -pos % 8
        if pos >= end:
            break
        code, siglen = raw[pos], raw[pos + 1]
        sig = raw[pos + 2 : pos + 2 + siglen].decode()
        pos += 3 + siglen
        if sig in ("s", "o"):
            pos += -pos % 4
            n = struct.unpack_from(e + "I", raw, pos)[0]
            pos += 5 + n
        elif sig == "g":
            pos += raw[pos] + 2
        elif sig == "u":
            pos += -pos % 4
            if code == F_UNIX_FDS:
                return int(struct.unpack_from(e + "I", raw, pos)[0])
            pos += 4
        else:
            return 0
    return 0
