"""The fast path's scanners: they take only whole, known-good messages and stop at the rest."""

from __future__ import annotations

import struct

import pytest

from tests.unit.test_header import make_message
from xdg_containers.core.fastpath import scan_calls, scan_replies
from xdg_containers.wire import header as h
from xdg_containers.wire.types import BodyWriter

MAX = 1 << 20
ECHO = "com.example.Echo"


#: Header-field types; a bytes value stands for an unknown field of type "ay".
_FIELD_SIGS = {
    h.FIELD_REPLY_SERIAL: "u", h.FIELD_UNIX_FDS: "u", h.FIELD_SIGNATURE: "g", h.FIELD_PATH: "o"
}


def msg(
    mtype: int,
    serial: int,
    fields: list[tuple[int, str | int | bytes]],
    body: bytes = b"",
    flags: int = 0,
    big_endian: bool = False,
) -> bytes:
    """A message with header fields in the order given (libdbus puts the destination
    before the reply serial; GDBus the reply serial first), by the reference marshaller."""
    wire = [
        (code, "ay" if isinstance(value, bytes) else _FIELD_SIGS.get(code, "s"), value)
        for code, value in fields
    ]
    data = make_message(not big_endian, mtype, serial, wire, flags=flags, body_bytes=body)
    h.parse_header(data)  # every message built here is valid
    return data


def call(serial: int, member: str = "Ping", flags: int = 0, **kw: object) -> bytes:
    body = BodyWriter()
    body.string("payload")
    return msg(
        h.METHOD_CALL,
        serial,
        [(h.FIELD_PATH, "/"), (h.FIELD_INTERFACE, "org.example.I"), (h.FIELD_MEMBER, member),
         (h.FIELD_DESTINATION, ECHO), (h.FIELD_SIGNATURE, "s")],
        body.bytes(),
        flags,
        **kw,  # type: ignore[arg-type]
    )


def fields_of(data: bytes) -> bytes:
    (fields_len,) = struct.unpack_from("<I", data, 12)
    return data[16 : 16 + fields_len]


def libdbus_reply(rs: int, sender: str = ":1.7", dest: str = ":1.42") -> bytes:
    return msg(
        h.METHOD_RETURN, 900 + rs,
        [(h.FIELD_DESTINATION, dest), (h.FIELD_REPLY_SERIAL, rs), (h.FIELD_SENDER, sender)],
    )


def gdbus_reply(rs: int, sender: str = ":1.8") -> bytes:
    body = BodyWriter()
    body.string("pong")
    return msg(
        h.METHOD_RETURN, 700 + rs,
        [(h.FIELD_REPLY_SERIAL, rs), (h.FIELD_DESTINATION, ":1.42"), (h.FIELD_SENDER, sender),
         (h.FIELD_SIGNATURE, "s")],
        body.bytes(),
    )


# -- calls ---------------------------------------------------------------------------------


def test_known_calls_are_taken_whole_and_replies_owed_only_when_expected() -> None:
    a, b, c = call(1), call(2, flags=h.NO_REPLY_EXPECTED), call(3)
    passes = {fields_of(a): ECHO}
    pos, count, owed = scan_calls(a + b + c, MAX, passes)
    assert (pos, count) == (len(a + b + c), 3)
    assert owed == [(1, ECHO), (3, ECHO)]


def test_calls_stop_at_the_first_unknown_shape() -> None:
    a, other = call(1), call(2, member="Other")
    pos, count, owed = scan_calls(a + other + call(3), MAX, {fields_of(a): ECHO})
    assert (pos, count, owed) == (len(a), 1, [(1, ECHO)])
    assert scan_calls(other + a, MAX, {fields_of(a): ECHO}) == (0, 0, [])


def test_calls_cut_by_the_chunk_end_are_left_for_the_general_path() -> None:
    stream = call(1) + call(2) + call(3)
    passes = {fields_of(call(1)): ECHO}
    size = len(call(1))
    for cut in range(len(stream) + 1):
        pos, count, _owed = scan_calls(stream[:cut], MAX, passes)
        assert pos == (cut // size) * size, cut
        assert count == cut // size


def test_calls_that_only_look_alike_are_not_taken() -> None:
    a = call(1)
    passes = {fields_of(a): ECHO}
    # Same field bytes, but a signal: never judged as a call.
    sig = bytearray(a)
    sig[1] = h.SIGNAL
    assert scan_calls(bytes(sig), MAX, passes)[0] == 0
    # Serial 0, another protocol version, big-endian: the general path rejects or judges them.
    for offset, value in ((8, 0), (3, 2)):
        bad = bytearray(a)
        if offset == 8:
            struct.pack_into("<I", bad, 8, 0)
        else:
            bad[offset] = value
        assert scan_calls(bytes(bad), MAX, passes)[0] == 0
    assert scan_calls(call(1, big_endian=True), MAX, passes)[0] == 0
    # Longer than the connection's limit.
    assert scan_calls(a, len(a) - 1, passes)[0] == 0


# -- replies -------------------------------------------------------------------------------


def test_replies_in_either_field_order_are_taken_with_their_serial_and_sender() -> None:
    stream = libdbus_reply(5) + gdbus_reply(6) + libdbus_reply(7)
    found = scan_replies(stream, MAX)
    assert [(rs, sender) for _end, rs, sender in found] == [(5, ":1.7"), (6, ":1.8"), (7, ":1.7")]
    assert found[-1][0] == len(stream)
    # Served from what was learned, with new serials.
    again = scan_replies(libdbus_reply(99) + gdbus_reply(100), MAX)
    assert [rs for _e, rs, _s in again] == [99, 100]


def test_error_replies_are_taken_too() -> None:
    err = msg(
        h.ERROR, 50,
        [(h.FIELD_ERROR_NAME, "org.example.Error.Nope"), (h.FIELD_REPLY_SERIAL, 12),
         (h.FIELD_DESTINATION, ":1.42"), (h.FIELD_SENDER, ":1.9")],
    )
    assert [(rs, s) for _e, rs, s in scan_replies(err, MAX)] == [(12, ":1.9")]


def test_replies_cut_by_the_chunk_end_stop_at_a_message_boundary() -> None:
    parts = [libdbus_reply(1), gdbus_reply(2), libdbus_reply(3)]
    stream = b"".join(parts)
    ends = [sum(len(p) for p in parts[: i + 1]) for i in range(len(parts))]
    for cut in range(len(stream) + 1):
        found = scan_replies(stream[:cut], MAX)
        assert [e for e, _rs, _s in found] == [e for e in ends if e <= cut], cut


def test_driver_replies_fd_replies_and_calls_go_to_the_general_path() -> None:
    from_driver = libdbus_reply(3, sender="org.freedesktop.DBus")
    assert scan_replies(from_driver, MAX) == []
    with_fds = msg(
        h.METHOD_RETURN, 77,
        [(h.FIELD_DESTINATION, ":1.42"), (h.FIELD_REPLY_SERIAL, 4), (h.FIELD_SENDER, ":1.7"),
         (h.FIELD_UNIX_FDS, 1)],
    )
    assert scan_replies(with_fds, MAX) == []
    assert scan_replies(call(1), MAX) == []
    # A good reply before them is still taken.
    good = libdbus_reply(8)
    assert [rs for _e, rs, _s in scan_replies(good + from_driver + good, MAX)] == [8]


def test_bytes_that_only_look_like_a_reply_serial_are_not_trusted() -> None:
    # Teach the scanner the libdbus offset (after a ":1.42" destination field): 32.
    scan_replies(libdbus_reply(1), MAX)
    at = 32
    # A reply whose first field is an unknown one (readers must skip it) holding bytes
    # that, at that offset, look like a reply-serial field claiming serial 0x1092.
    payload = b"zzzz" + b"\x05\x01u\x00" + struct.pack("<I", 0x1092) + b"tail"
    real = msg(
        h.METHOD_RETURN, 61,
        [(10, payload), (h.FIELD_DESTINATION, ":1.42"), (h.FIELD_REPLY_SERIAL, 3),
         (h.FIELD_SENDER, ":1.7")],
    )
    assert real[at : at + 4] == b"\x05\x01u\x00"
    assert h.parse_header(real).reply_serial == 3
    for _ in range(2):  # learning it once must not make it pass later either
        found = scan_replies(real, MAX)
        assert [rs for _e, rs, _s in found] in ([], [3])


def test_malformed_reply_headers_are_left_for_the_general_path() -> None:
    good = libdbus_reply(9)
    bad = bytearray(good)
    # Corrupt the sender field's signature: h.parse_header would reject the message.
    i = bytes(bad).index(b"\x07\x01s\x00")
    bad[i + 2] = ord("u")
    assert scan_replies(bytes(bad), MAX) == []
    assert scan_replies(good + bytes(bad), MAX)[-1][0] == len(good)


def test_a_reply_with_an_oversized_field_array_is_left_for_the_general_path() -> None:
    """The framing path closes a stream whose header-field array exceeds 64 MiB; the fast
    path, which does not go through it, must not forward such a reply either."""
    fields_len = h.MAX_HEADER_FIELDS_BYTES + 8
    data = bytearray(16 + fields_len)
    struct.pack_into("<BBBBIII", data, 0, ord("l"), h.METHOD_RETURN, 0, 1, 0, 77, fields_len)
    data[16:24] = b"\x05\x01u\x00" + struct.pack("<I", 5)
    raw = bytes(data)
    with pytest.raises(h.MessageError, match="too long"):
        h.parse_header(raw)
    assert scan_replies(raw, 1 << 30) == []
