"""Build the few messages the proxy writes itself: error replies, pings, rewritten replies."""

from __future__ import annotations

import struct

from xdg_containers.wire.header import (
    ERROR,
    FIELD_DESTINATION,
    FIELD_ERROR_NAME,
    FIELD_INTERFACE,
    FIELD_MEMBER,
    FIELD_PATH,
    FIELD_REPLY_SERIAL,
    FIELD_SENDER,
    FIELD_SIGNATURE,
    FIELD_TYPES,
    METHOD_CALL,
    METHOD_RETURN,
)
from xdg_containers.wire.types import BodyWriter

BUS_NAME = "org.freedesktop.DBus"
BUS_PATH = "/org/freedesktop/DBus"
BUS_INTERFACE = "org.freedesktop.DBus"



def build_message(
    message_type: int,
    serial: int,
    fields: dict[int, str | int],
    body: bytes = b"",
    flags: int = 0,
) -> bytes:
    """Marshal a little-endian message from header fields and an already built body."""
    h = BodyWriter()
    h.buf.extend(b"\0" * 16)  # fixed header placeholder; offsets count from 0
    for code in sorted(fields):
        value = fields[code]
        h._align(8)
        h.byte(code)
        sig = FIELD_TYPES[code]
        h.signature(sig)
        if sig == "u":
            assert isinstance(value, int)
            h.uint32(value)
        elif sig == "g":
            assert isinstance(value, str)
            h.signature(value)
        else:
            assert isinstance(value, str)
            h.string(value)
    fields_len = len(h.buf) - 16
    h._align(8)
    struct.pack_into(
        "<BBBBIII", h.buf, 0, ord("l"), message_type, flags, 1, len(body), serial, fields_len
    )
    return bytes(h.buf) + body


def error_reply(
    serial: int, reply_serial: int, destination: str | None, error_name: str, text: str
) -> bytes:
    """An error as the bus driver would send it: sender org.freedesktop.DBus, one string."""
    body = BodyWriter()
    body.string(text)
    fields: dict[int, str | int] = {
        FIELD_ERROR_NAME: error_name,
        FIELD_REPLY_SERIAL: reply_serial,
        FIELD_SENDER: BUS_NAME,
        FIELD_SIGNATURE: "s",
    }
    if destination:
        fields[FIELD_DESTINATION] = destination
    return build_message(ERROR, serial, fields, body.bytes())


def bus_call(
    serial: int,
    member: str,
    interface: str = BUS_INTERFACE,
    flags: int = 0,
    arg: str | None = None,
) -> bytes:
    """A method call to the bus driver, body-less or with one string argument
    (Ping substitution, the filter's AddMatch, the owner feed's Hello and AddMatch)."""
    fields: dict[int, str | int] = {
        FIELD_PATH: BUS_PATH,
        FIELD_INTERFACE: interface,
        FIELD_MEMBER: member,
        FIELD_DESTINATION: BUS_NAME,
    }
    body = b""
    if arg is not None:
        w = BodyWriter()
        w.string(arg)
        body = w.bytes()
        fields[FIELD_SIGNATURE] = "s"
    return build_message(METHOD_CALL, serial, fields, body, flags=flags)


def method_return(
    serial: int,
    reply_serial: int,
    sender: str | None,
    destination: str | None,
    signature: str,
    body: bytes,
) -> bytes:
    """A method return (used to re-emit a filtered bus-driver reply)."""
    fields: dict[int, str | int] = {FIELD_REPLY_SERIAL: reply_serial}
    if sender:
        fields[FIELD_SENDER] = sender
    if destination:
        fields[FIELD_DESTINATION] = destination
    if signature:
        fields[FIELD_SIGNATURE] = signature
    return build_message(METHOD_RETURN, serial, fields, body)

