"""Parse the fixed header and header-field array of a raw D-Bus message.

The proxy forwards the bytes it received; it only needs the routing fields, so
this module indexes them in one pass over the header and never touches the body.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .types import SignatureError, skip_value

# Message types.
METHOD_CALL = 1
METHOD_RETURN = 2
ERROR = 3
SIGNAL = 4

# Flags.
NO_REPLY_EXPECTED = 0x1
NO_AUTO_START = 0x2
ALLOW_INTERACTIVE_AUTHORIZATION = 0x4

# Header field codes.
FIELD_PATH = 1
FIELD_INTERFACE = 2
FIELD_MEMBER = 3
FIELD_ERROR_NAME = 4
FIELD_REPLY_SERIAL = 5
FIELD_DESTINATION = 6
FIELD_SENDER = 7
FIELD_SIGNATURE = 8
FIELD_UNIX_FDS = 9

#: A whole received message: bytes, or the reader's own buffer handed over.
Raw = bytes | bytearray

FIXED_HEADER_LEN = 16
#: The D-Bus specification's hard limit on a whole message.
SPEC_MAX_MESSAGE_BYTES = 128 * 1024 * 1024
#: The specification limits the header-field array to 64 MiB.
MAX_HEADER_FIELDS_BYTES = 64 * 1024 * 1024

_FIXED_LE = struct.Struct("<BBBBIII")
_FIXED_BE = struct.Struct(">BBBBIII")
_U32_LE = struct.Struct("<I")
_U32_BE = struct.Struct(">I")

#: The type each known header field must have.
FIELD_TYPES = {
    FIELD_PATH: "o",
    FIELD_INTERFACE: "s",
    FIELD_MEMBER: "s",
    FIELD_ERROR_NAME: "s",
    FIELD_REPLY_SERIAL: "u",
    FIELD_DESTINATION: "s",
    FIELD_SENDER: "s",
    FIELD_SIGNATURE: "g",
    FIELD_UNIX_FDS: "u",
}


class MessageError(ValueError):
    """The bytes are not a well-formed D-Bus message header; the peer must be dropped."""


def message_length(data: bytes | bytearray | memoryview, offset: int = 0) -> int:
    """Total length of the message whose fixed header starts at ``offset``.

    Needs only the first 16 bytes; raises MessageError for a bad endianness
    byte or protocol version.
    """
    endian = data[offset]
    if endian == 0x6C:  # 'l'
        fixed = _FIXED_LE
    elif endian == 0x42:  # 'B'
        fixed = _FIXED_BE
    else:
        raise MessageError(f"invalid endianness byte 0x{endian:02x}")
    _e, _t, _f, version, body_len, _serial, fields_len = fixed.unpack_from(data, offset)
    if version != 1:
        raise MessageError(f"unsupported protocol version {version}")
    if fields_len > MAX_HEADER_FIELDS_BYTES:
        raise MessageError(f"header field array of {fields_len} bytes is too long")
    header_end = FIXED_HEADER_LEN + fields_len
    header_end += -header_end & 7
    return int(header_end + body_len)


@dataclass(slots=True)
class Header:
    """Routing information of one message, taken from its header only."""

    little_endian: bool
    message_type: int
    flags: int
    serial: int
    body_length: int
    body_offset: int
    path: str | None = None
    interface: str | None = None
    member: str | None = None
    error_name: str | None = None
    reply_serial: int | None = None
    destination: str | None = None
    sender: str | None = None
    signature: str = ""
    unix_fds: int = 0

    @property
    def expects_reply(self) -> bool:
        """True for a method call whose caller wants an answer."""
        return self.message_type == METHOD_CALL and not self.flags & NO_REPLY_EXPECTED


def _decode_str(raw: bytes | bytearray | memoryview, what: str) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise MessageError(f"{what} is not valid UTF-8") from exc


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """Index the header fields of one complete message held in ``data``.

    Unknown header fields are skipped (the specification says to ignore them);
    a known field with the wrong type, or a truncated array, is a MessageError.
    Field arrays seen recently are looked up instead of parsed again: a client
    calling one method repeatedly sends the same array every time, and a reply
    differs from the previous one only in its leading reply serial.
    """
    little, u32, endian, mtype, flags, body_len, serial, body_offset, end = _fixed_part(data)
    fields_len = end - FIXED_HEADER_LEN
    if fields_len > _CACHE_MAX_FIELDS:
        return _parse_fields(data, little, u32, mtype, flags, serial, body_len, body_offset, end)[0]
    reply_serial: int | None = None
    key: tuple[int, bytes] | None = None
    hint: int | None = None
    for f in _RS_HINTS:
        # A reply serial field where one was before: key on everything else.
        if f + 8 <= end and data[f] == FIELD_REPLY_SERIAL and data[f + 1 : f + 4] == b"\x01u\x00":
            (reply_serial,) = u32.unpack_from(data, f + 4)
            hint = f
            key = (
                mtype | endian << 8 | f << 16,
                bytes(data[16 : f + 4]) + bytes(data[f + 8 : end]),
            )
            break
    if key is None:
        key = (mtype | endian << 8, bytes(data[16:end]))
    cached = _FIELD_CACHE.get(key)
    if cached is None:
        hdr, rs_field = _parse_fields(
            data, little, u32, mtype, flags, serial, body_len, body_offset, end
        )
        if hint is not None and rs_field != hint:
            # The bytes at the hint only looked like a reply-serial field (they sit
            # inside another field): this shape must never be served from the cache.
            return hdr
        if rs_field is not None and hint is None:
            # Remember where reply serials sit, and file this array under that shape.
            # An entry under a reply-serial key is only ever made from a parse that
            # found the field exactly there, so equal keys mean equal structure.
            if rs_field not in _RS_HINTS:
                _RS_HINTS.insert(0, rs_field)
                del _RS_HINTS[_MAX_RS_HINTS:]
            f = rs_field
            key = (
                mtype | endian << 8 | f << 16,
                bytes(data[16 : f + 4]) + bytes(data[f + 8 : end]),
            )
        if len(_FIELD_CACHE) >= _CACHE_MAX_ENTRIES:
            _FIELD_CACHE.clear()
        _FIELD_CACHE[key] = (
            None if rs_field is not None else hdr.reply_serial,
            hdr.path,
            hdr.interface,
            hdr.member,
            hdr.error_name,
            hdr.destination,
            hdr.sender,
            hdr.signature,
            hdr.unix_fds,
        )
        return hdr
    rs, path, interface, member, error_name, destination, sender, signature, unix_fds = cached
    if reply_serial == 0:
        raise MessageError("reply serial 0 is not allowed")
    if reply_serial is None:
        reply_serial = rs
    return Header(
        little,
        mtype,
        flags,
        serial,
        body_len,
        body_offset,
        path,
        interface,
        member,
        error_name,
        reply_serial,
        destination,
        sender,
        signature,
        unix_fds,
    )


def reply_serial_offset(data: bytes | bytearray | memoryview) -> tuple[Header, int | None]:
    """Parse a whole message like ``parse_header``, plus where its reply-serial field starts.

    Uncached: for learning the shape of a message once (see core/fastpath.py).
    """
    little, u32, _endian, mtype, flags, body_len, serial, body_offset, end = _fixed_part(data)
    return _parse_fields(data, little, u32, mtype, flags, serial, body_len, body_offset, end)


def _fixed_part(
    data: bytes | bytearray | memoryview,
) -> tuple[bool, struct.Struct, int, int, int, int, int, int, int]:
    """Check the fixed header of a whole message; return what parsing the fields needs:
    (little, u32, endian byte, type, flags, body length, serial, body offset, fields end)."""
    if len(data) < FIXED_HEADER_LEN:
        raise MessageError("message shorter than the fixed header")
    endian = data[0]
    if endian == 0x6C:
        fixed, u32, little = _FIXED_LE, _U32_LE, True
    elif endian == 0x42:
        fixed, u32, little = _FIXED_BE, _U32_BE, False
    else:
        raise MessageError(f"invalid endianness byte 0x{endian:02x}")
    _e, mtype, flags, version, body_len, serial, fields_len = fixed.unpack_from(data, 0)
    if version != 1:
        raise MessageError(f"unsupported protocol version {version}")
    if not 1 <= mtype <= 4:
        # The specification says to ignore unknown types; the bus would too,
        # but nothing legitimate sends them, so we refuse to route them.
        raise MessageError(f"unknown message type {mtype}")
    if serial == 0:
        raise MessageError("serial 0 is not allowed")
    if fields_len > MAX_HEADER_FIELDS_BYTES:
        # message_length() refuses these on the framing path; the fast path learns
        # reply shapes from here, so the bound must hold here too.
        raise MessageError(f"header field array of {fields_len} bytes is too long")
    end = FIXED_HEADER_LEN + fields_len
    body_offset = end + (-end & 7)
    if body_offset + body_len != len(data):
        raise MessageError("message length does not match its header")
    return little, u32, endian, mtype, flags, body_len, serial, body_offset, end


#: Parsed field arrays by (type and endianness, array bytes); bounded, cleared when full.
_FIELD_CACHE: dict[
    tuple[int, bytes],
    tuple[
        int | None, str | None, str | None, str | None, str | None, str | None, str | None, str, int
    ],
] = {}
_CACHE_MAX_ENTRIES = 2048
#: Offsets at which reply-serial fields were found (16 first: gdbus, dbus-fast put it there).
_RS_HINTS: list[int] = [16]
_MAX_RS_HINTS = 8
_CACHE_MAX_FIELDS = 1024


def _parse_fields(
    data: bytes | bytearray | memoryview,
    little: bool,
    u32: struct.Struct,
    mtype: int,
    flags: int,
    serial: int,
    body_len: int,
    body_offset: int,
    end: int,
) -> tuple[Header, int | None]:
    """Parse the header-field array between offset 16 and ``end``.

    Also returns the offset of the reply-serial field, if there is one.
    """
    hdr = Header(little, mtype, flags, serial, body_len, body_offset)
    pos = FIXED_HEADER_LEN
    seen = 0
    rs_field: int | None = None
    while pos < end:
        pos += -pos & 7
        field_start = pos
        if pos >= end:
            break
        code = data[pos]
        siglen = data[pos + 1]
        sig_start = pos + 2
        sig_end = sig_start + siglen
        if sig_end >= end or data[sig_end] != 0:
            raise MessageError("truncated header field signature")
        sig = bytes(data[sig_start:sig_end]).decode("ascii", "replace")
        pos = sig_end + 1
        if code == 0:
            raise MessageError("header field code 0 is invalid")
        expected = FIELD_TYPES.get(code)
        if expected is None:
            try:
                pos = skip_value(data, pos, sig, little, end)
            except SignatureError as exc:
                raise MessageError(f"bad unknown header field {code}: {exc}") from exc
            continue
        if seen & (1 << code):
            raise MessageError(f"header field {code} appears twice")
        seen |= 1 << code
        if sig != expected:
            raise MessageError(f"header field {code} has type {sig!r}, expected {expected!r}")
        if expected == "u":
            pos += -pos & 3
            if pos + 4 > end:
                raise MessageError("truncated header field")
            (value,) = u32.unpack_from(data, pos)
            pos += 4
            if code == FIELD_REPLY_SERIAL:
                if value == 0:
                    raise MessageError("reply serial 0 is not allowed")
                hdr.reply_serial = value
                rs_field = field_start
            else:
                hdr.unix_fds = value
            continue
        if expected == "g":
            n = data[pos]
            if pos + 1 + n >= end or data[pos + 1 + n] != 0:
                raise MessageError("truncated signature header field")
            hdr.signature = bytes(data[pos + 1 : pos + 1 + n]).decode("ascii", "replace")
            pos += n + 2
            continue
        pos += -pos & 3
        if pos + 4 > end:
            raise MessageError("truncated header field")
        (n,) = u32.unpack_from(data, pos)
        start = pos + 4
        stop = start + n
        if stop >= end or data[stop] != 0:
            raise MessageError("truncated string header field")
        text = _decode_str(data[start:stop], "header field")
        pos = stop + 1
        if code == FIELD_PATH:
            hdr.path = text
        elif code == FIELD_INTERFACE:
            hdr.interface = text
        elif code == FIELD_MEMBER:
            hdr.member = text
        elif code == FIELD_ERROR_NAME:
            hdr.error_name = text
        elif code == FIELD_DESTINATION:
            hdr.destination = text
        else:
            hdr.sender = text
    _check_required(hdr)
    return hdr, rs_field


def _check_required(hdr: Header) -> None:
    """Reject messages missing the fields their type requires (as the bus does)."""
    t = hdr.message_type
    if t == METHOD_CALL:
        if hdr.path is None or hdr.member is None:
            raise MessageError("method call without path or member")
    elif t == SIGNAL:
        if hdr.path is None or hdr.member is None or hdr.interface is None:
            raise MessageError("signal without path, interface or member")
    elif t == ERROR:
        if hdr.error_name is None or hdr.reply_serial is None:
            raise MessageError("error without name or reply serial")
    elif hdr.reply_serial is None:
        raise MessageError("method return without reply serial")
