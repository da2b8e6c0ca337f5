"""Property tests for the wire layer: MessageReader (framing, fds) and parse_header.

What tests/unit/test_framing.py and test_header.py do not cover yet:

- random *messages* (both endiannesses, random flags and serials up to 2^32-1, known and
  unknown header fields, 256+ byte strings, random bodies), streamed with random splits:
  the reader gives back exactly those messages and parse_header reads back every field;
- *mutated and random* streams: the reader raises nothing but MessageError (FramingError
  is one) and what it hands out is always a prefix of the input, cut at message ends;
- a header claiming a huge size: memory follows the bytes received, not the claim;
- fds: matching counts give each message exactly its own fds; any mismatch is a
  FramingError, never another exception, and no fd is leaked either way.

Deterministic by default (``derandomize``); ``XDGC_FUZZ_EXAMPLES=20000`` runs longer with
fresh randomness.
"""

from __future__ import annotations

import itertools
import os
import struct
import tracemalloc
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fuzz import fuzz_settings
from tests.support.processes import fd_is_open
from tests.support.wire import build_message, marshal
from xdg_containers.wire.framing import FramingError, MessageReader
from xdg_containers.wire.header import (
    ERROR,
    METHOD_CALL,
    METHOD_RETURN,
    SIGNAL,
    MessageError,
    message_length,
    parse_header,
)

FUZZ = fuzz_settings()
LIMIT = 128 * 1024 * 1024

# -- strategies ---------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
_long_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
    min_size=256,
    max_size=700,
)
_str = st.one_of(_text, _long_text)
_sig = st.text(st.sampled_from("ybnqiuxtdsog"), max_size=12)

#: Values for unknown header fields: (signature, value) pairs our marshaller can write.
_unknown_value = st.one_of(
    st.tuples(st.just("s"), _str),
    st.tuples(st.just("o"), st.just("/x/y")),
    st.tuples(st.just("g"), _sig),
    st.tuples(st.just("y"), st.integers(0, 255)),
    st.tuples(st.just("u"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("t"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("d"), st.floats(allow_nan=False)),
    st.tuples(st.just("as"), st.lists(_text, max_size=4)),
    st.tuples(st.just("ay"), st.binary(max_size=300)),
    st.tuples(
        st.just("a{sv}"),
        st.dictionaries(_text, st.tuples(st.just("u"), st.integers(0, 9)), max_size=3),
    ),
    st.tuples(st.just("(su)"), st.tuples(_text, st.integers(0, 2**32 - 1))),
    st.tuples(st.just("v"), st.tuples(st.just("s"), _text)),
)


@st.composite
def messages(draw: Any, little: bool | None = None) -> tuple[bytes, dict[str, Any]]:
    """A well-formed message and what parse_header must read from it."""
    if little is None:
        little = draw(st.booleans())
    mtype = draw(st.sampled_from([METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL]))
    expect: dict[str, Any] = {
        "little_endian": little,
        "message_type": mtype,
        "flags": draw(st.integers(0, 255)),
        "serial": draw(
            st.one_of(
                st.integers(1, 2**32 - 1),
                st.sampled_from([1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]),
            )
        ),
    }
    fields: list[tuple[int, str, Any]] = []
    known = {
        1: ("o", "path", st.sampled_from(["/", "/a", "/org/freedesktop/DBus/Local", "/x/y_z"])),
        2: ("s", "interface", _str),
        3: ("s", "member", _str),
        4: ("s", "error_name", _str),
        5: ("u", "reply_serial", st.integers(1, 2**32 - 1)),
        6: ("s", "destination", _str),
        7: ("s", "sender", _str),
        9: ("u", "unix_fds", st.integers(0, 2**32 - 1)),
    }
    required = {METHOD_CALL: {1, 3}, SIGNAL: {1, 2, 3}, ERROR: {4, 5}, METHOD_RETURN: {5}}[mtype]
    chosen = required | set(draw(st.sets(st.sampled_from(sorted(known)), max_size=8)))
    for code in sorted(chosen):
        sig, name, strat = known[code]
        value = draw(strat)
        fields.append((code, sig, value))
        expect[name] = value
    for _ in range(draw(st.integers(0, 3))):
        code = draw(st.integers(10, 255))
        sig, value = draw(_unknown_value)
        fields.append((code, sig, value))
    body_sig = draw(st.sampled_from(["", "s", "u", "ay", "as", "a{sv}"]))
    body = b""
    if body_sig:
        fields.append((8, "g", body_sig))
        arg = {
            "s": _str,
            "u": st.integers(0, 2**32 - 1),
            "ay": st.binary(max_size=2000),
            "as": st.lists(_text, max_size=5),
            "a{sv}": st.dictionaries(_text, st.tuples(st.just("s"), _text), max_size=3),
        }[body_sig]
        body = marshal(body_sig, [draw(arg)], little)
    expect["signature"] = body_sig
    draw(st.randoms()).shuffle(fields)  # header fields may come in any order
    raw = build_message(mtype, expect["serial"], fields, body, flags=expect["flags"], little=little)
    return raw, expect


def _cuts(draw: Any, n: int, max_cuts: int = 10) -> list[int]:
    return sorted(set(draw(st.lists(st.integers(0, n), max_size=max_cuts))))


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *[c for c in cuts if 0 < c < len(data)], len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def _drain(reader: MessageReader, out: list[bytes]) -> None:
    while True:
        item = reader.next_message()
        if item is None:
            return
        out.append(bytes(item[0]))


# -- well-formed streams ----------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_random_messages_random_splits_come_back_whole(data: Any) -> None:
    msgs = data.draw(st.lists(messages(), min_size=1, max_size=5))
    stream = b"".join(raw for raw, _ in msgs)
    cuts = _cuts(data.draw, len(stream), 12)
    reader = MessageReader(LIMIT)
    out: list[bytes] = []
    for chunk in _chunks(stream, cuts):
        reader.feed(chunk)
        _drain(reader, out)
    assert out == [raw for raw, _ in msgs]
    assert b"".join(out) == stream
    assert reader.buffered == 0 and reader.wanted() == 0
    for raw, expect in msgs:
        assert message_length(raw) == len(raw)
        hdr = parse_header(raw)
        for name, value in expect.items():
            assert getattr(hdr, name) == value, name


@fuzz_settings(40)
@given(msg=messages(), lead=st.binary(min_size=1, max_size=64))
def test_partial_messages_are_not_handed_out(msg: tuple[bytes, Any], lead: bytes) -> None:
    raw, _ = msg
    reader = MessageReader(LIMIT)
    reader.feed(raw[:-1])
    assert reader.next_message() is None
    assert reader.buffered == len(raw) - 1
    reader.feed(raw[-1:])
    item = reader.next_message()
    assert item is not None and bytes(item[0]) == raw


# -- hostile streams -----------------------------------------------------------------------------


@st.composite
def mutated_streams(draw: Any) -> bytes:
    msgs = draw(st.lists(messages(), min_size=1, max_size=4))
    stream = bytearray(b"".join(raw for raw, _ in msgs))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "length", "truncate"]))
        if not stream:
            break
        pos = draw(st.integers(0, len(stream) - 1))
        if kind == "flip":
            stream[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            stream[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            stream[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del stream[pos : pos + draw(st.integers(1, 16))]
        elif kind == "length":
            # Overwrite a body length or field-array length of the first message.
            at = draw(st.sampled_from([4, 12]))
            if len(stream) >= at + 4:
                stream[at : at + 4] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
        else:
            del stream[pos:]
    return bytes(stream)


def _check_hostile(stream: bytes, cuts: list[int], limit: int) -> None:
    reader = MessageReader(limit)
    out: list[bytes] = []
    try:
        for chunk in _chunks(stream, cuts):
            reader.feed(chunk)
            _drain(reader, out)
    except MessageError:
        failed = True  # FramingError is a MessageError
    else:
        failed = False
    consumed = b"".join(out)
    assert stream.startswith(consumed), "the reader handed out bytes it was never given"
    for m in out:
        assert message_length(m) == len(m)
        assert len(m) <= limit
        try:
            parse_header(m)
        except MessageError:
            pass
    if not failed:
        assert len(consumed) + reader.buffered == len(stream)
    reader.close()


@FUZZ
@given(data=st.data(), stream=mutated_streams())
def test_mutated_streams_raise_only_message_error(data: Any, stream: bytes) -> None:
    _check_hostile(stream, _cuts(data.draw, len(stream)), LIMIT)


@FUZZ
@given(data=st.data(), stream=mutated_streams(), limit=st.integers(16, 4096))
def test_mutated_streams_with_small_limits(data: Any, stream: bytes, limit: int) -> None:
    _check_hostile(stream, _cuts(data.draw, len(stream)), limit)


@FUZZ
@given(data=st.data(), stream=st.binary(max_size=600))
def test_random_bytes_raise_only_message_error(data: Any, stream: bytes) -> None:
    _check_hostile(stream, _cuts(data.draw, len(stream)), LIMIT)


@FUZZ
@given(
    little=st.booleans(),
    fields=st.binary(max_size=300),
    fields_len=st.integers(0, 400),
    body=st.binary(max_size=64),
    mtype=st.integers(0, 6),
    serial=st.integers(0, 2**32 - 1),
)
def test_garbage_header_fields_raise_only_message_error(
    little: bool, fields: bytes, fields_len: int, body: bytes, mtype: int, serial: int
) -> None:
    """A fixed header that frames correctly around arbitrary field-array bytes."""
    e = "<" if little else ">"
    arr = fields[:fields_len].ljust(fields_len, b"\0")
    pad = b"\0" * (-(16 + fields_len) % 8)
    raw = (
        struct.pack(
            e + "BBBBIII", 0x6C if little else 0x42, mtype, 0, 1, len(body), serial, fields_len
        )
        + arr
        + pad
        + body
    )
    reader = MessageReader(LIMIT)
    reader.feed(raw)
    item = reader.next_message()
    assert item is not None and bytes(item[0]) == raw
    try:
        parse_header(raw)
    except MessageError:
        pass


@settings(FUZZ, max_examples=min(FUZZ.max_examples, 25))
@given(
    claim=st.integers(8 * 1024 * 1024, LIMIT - 1024),
    fed=st.integers(16, 64 * 1024),
    little=st.booleans(),
)
def test_claimed_size_is_never_reserved(claim: int, fed: int, little: bool) -> None:
    e = "<" if little else ">"
    head = struct.pack(e + "BBBBIII", 0x6C if little else 0x42, 1, 0, 1, claim, 1, 0)
    data = (head + b"\xee" * fed)[:fed]
    reader = MessageReader(LIMIT)
    tracemalloc.start()
    try:
        reader.feed(data)
        assert reader.next_message() is None
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.buffered == len(data)
    if len(data) >= 16:
        assert reader.wanted() == 16 + claim - len(data)
    assert peak < 4 * fed + 64 * 1024, f"{peak} bytes allocated for {fed} received"


@FUZZ
@given(claim=st.integers(LIMIT - 15, 2**32 - 1), little=st.booleans())
def test_claims_over_the_limit_fail_at_once(claim: int, little: bool) -> None:
    e = "<" if little else ">"
    reader = MessageReader(LIMIT)
    reader.feed(struct.pack(e + "BBBBIII", 0x6C if little else 0x42, 1, 0, 1, claim, 1, 0))
    try:
        reader.next_message()
    except FramingError:
        return
    raise AssertionError("a claim over the limit was accepted")


# -- fds --------------------------------------------------------------------------------------


def _open_fds(n: int) -> list[int]:
    return [os.open(os.devnull, os.O_RDONLY) for _ in range(n)]


@FUZZ
@given(
    plan=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=5),
    little=st.booleans(),
    together=st.booleans(),
)
def test_fd_counts_match_or_fail_cleanly(
    plan: list[tuple[int, int]], little: bool, together: bool
) -> None:
    """Each message declares ``d`` fds and arrives with ``a`` fds on its first byte.

    Used as the proxy uses it: take_fds(declared) per message, check_no_stray_fds when the
    buffer is drained. ``together`` feeds everything in one chunk (fds in order).
    """
    raws = [
        build_message(
            METHOD_CALL,
            i + 1,
            [(1, "o", "/"), (3, "s", "M"), (9, "u", d)] if d else [(1, "o", "/"), (3, "s", "M")],
            little=little,
        )
        for i, (d, _a) in enumerate(plan)
    ]
    sent = [_open_fds(a) for _d, a in plan]
    all_fds = [fd for group in sent for fd in group]
    reader = MessageReader(LIMIT)
    claimed: list[list[int]] = []
    fed: list[int] = []
    error: Exception | None = None
    try:
        feeds = [(b"".join(raws), all_fds)] if together else list(zip(raws, sent, strict=True))
        for data, fds in feeds:
            fed += fds
            reader.feed(data, fds)
            while True:
                item = reader.next_message()
                if item is None:
                    reader.check_no_stray_fds()
                    break
                declared = parse_header(item[0]).unix_fds
                claimed.append(reader.take_fds(declared) if declared else [])
    except FramingError as exc:
        error = exc
    finally:
        reader.close()
    if all(d == a for d, a in plan):
        assert error is None
        assert claimed == sent, "a message got fds that were not its own"
    elif sum(d for d, _ in plan) != sum(a for _, a in plan):
        assert error is not None, "fds that do not add up were accepted"
    elif not together:
        assert error is not None, "fds sent with the wrong message were accepted"
    # No leak: what the reader still held is closed; what it handed out is ours to close.
    handed = {fd for group in claimed for fd in group}
    for fd in all_fds:
        if fd in handed or fd not in fed:
            assert fd_is_open(fd)
            os.close(fd)
        else:
            assert not fd_is_open(fd), "the reader leaked an fd"


# -- parse_header must not depend on what it parsed before ---------------------------------------


def _rs_at(serial: int, ay_len: int, rs: int, tail: list[tuple[int, str, Any]]) -> bytes:
    """A METHOD_RETURN: an unknown ``ay`` field first (value bytes from offset 28), then the
    reply-serial field at ``align8(28 + ay_len)``."""
    return build_message(METHOD_RETURN, serial, [(42, "ay", b"a" * ay_len), (5, "u", rs), *tail])


@FUZZ
@given(
    slot=st.integers(4, 20),
    real=st.integers(1, 2**32 - 1),
    fakes=st.lists(st.integers(1, 2**32 - 1), min_size=2, max_size=4, unique=True),
    little=st.booleans(),
    dest=st.sampled_from([":1.5", "org.example.Peer"]),
)
def test_parse_header_is_independent_of_history(
    slot: int, real: int, fakes: list[int], little: bool, dest: str
) -> None:
    """Bytes that merely look like a reply-serial field (inside an unknown field's value)
    must never be taken for one, whatever was parsed before.

    First a message whose real reply-serial field sits at offset P (the parser may learn
    P); then messages whose unknown field holds ``05 01 'u' 00`` + a fake serial at P and
    whose real reply-serial field comes after it: each must read the real serial.
    """
    pos = 8 * slot  # P, 8-aligned, past the unknown field's header
    tail = [(6, "s", dest)]
    prime = _rs_at(1, pos - 28, 77, tail)
    assert parse_header(prime).reply_serial == 77
    e = "<" if little else ">"
    for i, fake in enumerate(fakes):
        value = b"x" * (pos - 28) + b"\x05\x01u\x00" + struct.pack(e + "I", fake)
        fields = [(42, "ay", value), (5, "u", real), *tail]
        raw = build_message(METHOD_RETURN, 2 + i, fields, little=little)
        hdr = parse_header(raw)
        assert hdr.reply_serial == real, (
            f"reply serial read as {hdr.reply_serial} (bytes of an unknown field at offset "
            f"{pos}), the message's reply serial is {real}"
        )
        assert hdr.destination == dest
