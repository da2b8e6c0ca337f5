"""Self-tests of the tests' raw marshaller (tests/support/wire.py): dbus-fast must read
what it writes, in both byte orders, and unknown header fields come out as asked."""

from __future__ import annotations

from tests.support.wire import (
    F_MEMBER,
    F_PATH,
    METHOD_CALL,
    build_message,
    declared_fds,
    decode,
    method_call,
    wire_length,
)

# ----------------------------------------------------------------------------------------
# self-tests of the marshaller (dbus-fast must read what we write, in both byte orders)


def test_marshal_round_trips_through_dbus_fast() -> None:
    for little in (True, False):
        args = ["text", 7, [1, 2, 3], {"k": ("s", "v")}, ("x", 5), b"\x00\x01"]
        raw = method_call(
            0xFFFFFFFF,
            "org.example.Dest",
            "/a/b",
            "org.example.I",
            "M",
            "suaia{sv}(si)ay",
            args,
            little=little,
        )
        msg = decode(raw)
        assert msg.serial == 0xFFFFFFFF
        assert msg.destination == "org.example.Dest"
        assert msg.body[0] == "text" and msg.body[2] == [1, 2, 3]
        assert msg.body[3]["k"].value == "v"
        assert list(msg.body[4]) == ["x", 5]
        assert msg.body[5] == b"\x00\x01"
        assert wire_length(raw) == len(raw)


def test_unknown_header_fields_are_written_as_asked() -> None:
    long = "x" * 300
    raw = build_message(
        METHOD_CALL,
        3,
        [(F_PATH, "o", "/p"), (F_MEMBER, "s", "M"), (77, "s", long), (200, "ay", b"abc")],
    )
    # dbus-fast refuses unknown field codes (KeyError), so read it with the service's parser.
    from xdg_containers.wire.header import parse_header

    hdr = parse_header(raw)
    assert hdr.member == "M" and hdr.path == "/p"
    assert raw.count(long.encode()) == 1
    assert declared_fds(raw) == 0
    assert declared_fds(method_call(1, None, "/", None, "M", unix_fds=3)) == 3
