"""The steady-state shortcut: whole messages read in one chunk, judged from caches.

After the handshake nearly every message a client sends is a method call whose
header fields are byte-for-byte those of an earlier call that passed, and
nearly every message it gets is a reply from a peer. These scanners walk a
freshly read chunk by offsets, with no copy and no Header object, and stop at
the first message that needs the general path (anything unseen, from or to the
bus driver, carrying fds, big-endian, or cut by the chunk's end). The session
sends the scanned prefix in one write and feeds the rest to the general path,
so order is kept. Decisions only; no I/O here.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from ..wire.header import ERROR, METHOD_CALL, METHOD_RETURN, MessageError, reply_serial_offset
from .decision import BUS_NAME

_FIXED = struct.Struct("<BBBBIII")
_U32 = struct.Struct("<I")
_LITTLE = 0x6C
_NO_REPLY_EXPECTED = 0x1
#: The start of a reply-serial header field: code 5, signature "u".
_RS_FIELD = b"\x05\x01u\x00"
#: Offsets in a message where reply-serial fields were found (libdbus puts the
#: destination first, GDBus and dbus-fast the reply serial); tried in order.
_RS_AT: list[int] = [16]
_MAX_RS_AT = 8

_ReplyKey = tuple[int, bytes, bytes]
#: Senders of replies (None: not for the fast path) by shape; bounded.
_REPLY_SENDERS: dict[_ReplyKey, str | None] = {}
_MAX_REPLY_SENDERS = 1024


def scan_calls(
    data: bytes, max_len: int, passes: Mapping[bytes, str]
) -> tuple[int, int, list[tuple[int, str]]]:
    """Leading method calls in ``data`` whose header fields are in ``passes``.

    ``passes`` maps a header-field array (the bytes after the fixed header) to
    the destination of calls known to pass with exactly those fields. Returns
    the bytes those calls take, how many they are, and (serial, destination)
    of the ones that expect a reply.
    """
    n = len(data)
    pos = 0
    count = 0
    owed: list[tuple[int, str]] = []
    while n - pos >= 16:
        endian, mtype, flags, version, body_len, serial, fields_len = _FIXED.unpack_from(data, pos)
        if endian != _LITTLE or mtype != METHOD_CALL or version != 1 or not serial:
            break
        end = pos + 16 + fields_len
        size = 16 + fields_len + (-fields_len & 7) + body_len
        if size > max_len or pos + size > n:
            break
        dest = passes.get(data[pos + 16 : end])
        if dest is None:
            break
        if not flags & _NO_REPLY_EXPECTED:
            owed.append((serial, dest))
        pos += size
        count += 1
    return pos, count, owed


def scan_replies(data: bytes, max_len: int) -> list[tuple[int, int, str]]:
    """Leading replies in ``data`` from peers other than the bus driver, without fds.

    Returns (end offset, reply serial, sender) for each, in order; the caller
    takes as many as its bookkeeping accepts. Header fields are validated by
    the full parser the first time a shape is seen and looked up after that:
    the key is every header-field byte except the reply serial's value, at an
    offset where a parse found that field, so equal keys mean equal fields.
    """
    n = len(data)
    pos = 0
    found: list[tuple[int, int, str]] = []
    while n - pos >= 24:
        endian, mtype, _flags, version, body_len, serial, fields_len = _FIXED.unpack_from(data, pos)
        if endian != _LITTLE or version != 1 or not serial:
            break
        if mtype != METHOD_RETURN and mtype != ERROR:
            break
        fields_end = 16 + fields_len
        size = fields_end + (-fields_len & 7) + body_len
        if size > max_len or pos + size > n:
            break
        at = -1
        for hint in _RS_AT:
            if hint + 8 <= fields_end and data[pos + hint : pos + hint + 4] == _RS_FIELD:
                at = hint
                break
        if at < 0:
            at = _learn_offset(data[pos : pos + size])
            if at < 0:
                break
        (rs,) = _U32.unpack_from(data, pos + at + 4)
        if not rs:
            break
        before = data[pos + 16 : pos + at + 4]
        key = (mtype | at << 8, before, data[pos + at + 8 : pos + fields_end])
        try:
            sender = _REPLY_SENDERS[key]
        except KeyError:
            sender = _learn_reply(key, at, data[pos : pos + size])
        if sender is None:
            break
        pos += size
        found.append((pos, rs, sender))
    return found


def _learn_offset(message: bytes) -> int:
    """Where this message's reply serial sits (remembered as a hint), or -1."""
    try:
        _hdr, at = reply_serial_offset(message)
    except MessageError:
        return -1
    if at is None:
        return -1
    if at not in _RS_AT:
        _RS_AT.insert(0, at)
        del _RS_AT[_MAX_RS_AT:]
    return at


def _learn_reply(key: _ReplyKey, at: int, message: bytes) -> str | None:
    """Validate a reply shape once; remember its sender if it qualifies for the fast path."""
    try:
        hdr, found_at = reply_serial_offset(message)
    except MessageError:
        return None  # not remembered: the general path reports it
    sender = hdr.sender
    if found_at != at or hdr.unix_fds or sender is None or sender == BUS_NAME:
        # (found_at != at: the bytes at the hint only looked like a reply serial.)
        sender = None
    if len(_REPLY_SENDERS) >= _MAX_REPLY_SENDERS:
        _REPLY_SENDERS.clear()
    _REPLY_SENDERS[key] = sender
    return sender
