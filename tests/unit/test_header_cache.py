"""The field-array cache of parse_header gives exactly what a fresh parse gives."""

from __future__ import annotations

from dbus_fast import Message, MessageType
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.wire import build_message, marshal
from xdg_containers.wire import header
from xdg_containers.wire.header import parse_header


def _reply(reply_serial: int, serial: int, dest: str = ":1.5") -> bytes:
    return bytes(
        Message(
            message_type=MessageType.METHOD_RETURN,
            reply_serial=reply_serial,
            destination=dest,
            signature="s",
            body=["x"],
            serial=serial,
        )._marshall(False)
    )


def _fresh(data: bytes) -> header.Header:
    header._FIELD_CACHE.clear()
    return parse_header(data)


@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(1, 2**32 - 1), st.integers(1, 2**32 - 1)), min_size=1,
                max_size=8))
def test_replies_differing_only_in_reply_serial(pairs: list[tuple[int, int]]) -> None:
    header._FIELD_CACHE.clear()
    for rs, serial in pairs:
        data = _reply(rs, serial)
        cached = parse_header(data)
        assert cached.reply_serial == rs
        assert cached.serial == serial
        assert cached == _fresh(data)
        parse_header(data)  # leave it cached for the next round


def test_error_with_reply_serial_not_first_keeps_it() -> None:
    data = bytes(
        Message(
            message_type=MessageType.ERROR,
            error_name="org.example.Error",
            reply_serial=42,
            destination=":1.5",
            signature="s",
            body=["x"],
            serial=3,
        )._marshall(False)
    )
    first = _fresh(data)
    second = parse_header(data)
    assert second.reply_serial == first.reply_serial == 42
    assert second.error_name == "org.example.Error"


def test_same_fields_different_type_are_not_confused() -> None:
    call = bytes(
        Message(destination="org.example.A", path="/p", interface="org.example.I", member="M",
                serial=1)._marshall(False)
    )
    signal = bytearray(call)
    signal[1] = 4  # same field array, as a signal
    header._FIELD_CACHE.clear()
    assert parse_header(call).message_type == 1
    assert parse_header(bytes(signal)).message_type == 4


def _relayed_reply(reply_serial: int) -> bytes:
    """A reply laid out as libdbus sends it and dbus-daemon relays it: the serial not first."""
    fields = [(6, "s", ":1.5"), (5, "u", reply_serial), (8, "g", "s"), (7, "s", ":1.3")]
    return build_message(2, 9, fields, marshal("s", ["hello"]))


def test_relayed_replies_share_one_cache_entry_and_keep_their_serials() -> None:
    header._FIELD_CACHE.clear()
    for rs in range(1, 500):
        hdr = parse_header(_relayed_reply(rs))
        assert hdr.reply_serial == rs
        assert hdr.destination == ":1.5" and hdr.sender == ":1.3" and hdr.signature == "s"
    assert len(header._FIELD_CACHE) == 1
    bad = bytearray(_relayed_reply(7))
    bad[36:40] = b"\0\0\0\0"  # the reply serial value of the second field
    try:
        parse_header(bytes(bad))
    except header.MessageError:
        pass
    else:
        raise AssertionError("reply serial 0 must be refused on a cache hit too")
