"""Tests for xdg_containers.wire.framing.MessageReader: splitting a byte stream into messages."""

from __future__ import annotations

import itertools
import os
import struct
import tracemalloc
from collections.abc import Iterator

import pytest
from dbus_fast import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.processes import fd_is_open
from tests.support.wire import method_call
from xdg_containers.wire.build import build_message, bus_call
from xdg_containers.wire.framing import (
    MAX_FDS_PER_MESSAGE,
    MAX_QUEUED_FDS,
    FramingError,
    MessageReader,
)
from xdg_containers.wire.header import (
    FIELD_MEMBER,
    FIELD_PATH,
    FIELD_SIGNATURE,
    FIELD_UNIX_FDS,
    METHOD_CALL,
    MessageError,
    parse_header,
)

LIMIT = 128 * 1024 * 1024


def be_message(serial: int, member: str, payload: bytes = b"", unix_fds: int = 0) -> bytes:
    """A big-endian method call with an ``ay`` body (tests/support/wire.py)."""
    return method_call(
        serial, None, "/p", None, member, "ay", [payload], little=False, unix_fds=unix_fds
    )


def le_message(serial: int, payload: bytes = b"", unix_fds: int = 0) -> bytes:
    fields: dict[int, str | int] = {FIELD_PATH: "/q", FIELD_MEMBER: "Le", FIELD_SIGNATURE: "ay"}
    if unix_fds:
        fields[FIELD_UNIX_FDS] = unix_fds
    return build_message(METHOD_CALL, serial, fields, struct.pack("<I", len(payload)) + payload)


def test_be_helper_is_valid() -> None:
    raw = be_message(7, "Big", b"xyz", unix_fds=2)
    hdr = parse_header(raw)
    assert (hdr.little_endian, hdr.member, hdr.unix_fds, hdr.signature) == (False, "Big", 2, "ay")
    assert raw[hdr.body_offset :] == b"\0\0\0\x03xyz"


STREAM_MESSAGES = [
    le_message(1, b"first"),
    be_message(2, "Second", b"\xff" * 37),
    bytes(
        Message(path="/x", member="Third", signature="s", body=["\r\n" * 9], serial=3)._marshall(
            False
        )
    ),
    bus_call(4, "Hello"),
    be_message(5, "Fifth"),
]
STREAM = b"".join(STREAM_MESSAGES)


def drain(reader: MessageReader) -> Iterator[bytes]:
    while (item := reader.next_message()) is not None:
        data, fds = item
        assert fds == []
        yield data


def test_single_message() -> None:
    reader = MessageReader(LIMIT)
    msg = le_message(1, b"abc")
    reader.feed(msg)
    assert reader.buffered == len(msg)
    assert reader.next_message() == (msg, [])
    assert reader.next_message() is None
    assert reader.buffered == 0


def test_concatenated_messages_in_one_feed() -> None:
    reader = MessageReader(LIMIT)
    reader.feed(STREAM)
    assert list(drain(reader)) == STREAM_MESSAGES
    assert reader.buffered == 0
    assert reader.wanted() == 0


def test_accepts_bytearray_and_memoryview() -> None:
    reader = MessageReader(LIMIT)
    reader.feed(bytearray(STREAM[:50]))
    reader.feed(memoryview(STREAM)[50:])
    assert list(drain(reader)) == STREAM_MESSAGES


def test_every_split_point() -> None:
    for i in range(len(STREAM) + 1):
        reader = MessageReader(LIMIT)
        reader.feed(STREAM[:i])
        got = list(drain(reader))
        reader.feed(STREAM[i:])
        got += drain(reader)
        assert got == STREAM_MESSAGES, f"split at {i}"
        assert reader.buffered == 0


def test_one_byte_at_a_time() -> None:
    reader = MessageReader(LIMIT)
    got: list[bytes] = []
    for i in range(len(STREAM)):
        reader.feed(STREAM[i : i + 1])
        got += drain(reader)
    assert got == STREAM_MESSAGES


@settings(max_examples=80, deadline=None)
@given(cuts=st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_random_splits(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    reader = MessageReader(LIMIT)
    got: list[bytes] = []
    for a, b in itertools.pairwise(points):
        reader.feed(STREAM[a:b])
        got += drain(reader)
    assert got == STREAM_MESSAGES
    assert reader.buffered == 0


def test_wanted_counts_missing_bytes() -> None:
    msg = be_message(9, "Wanted", b"w" * 100)
    reader = MessageReader(LIMIT)
    reader.feed(msg[:10])
    assert reader.next_message() is None
    assert reader.wanted() == 0  # length unknown before 16 bytes
    reader.feed(msg[10:20])
    assert reader.next_message() is None
    assert reader.wanted() == len(msg) - 20
    reader.feed(msg[20:])
    assert reader.next_message() == (msg, [])
    assert reader.wanted() == 0


def test_long_stream_keeps_buffer_bounded() -> None:
    """A partial message always pending: consumed bytes must still be released."""
    msgs = [le_message(i + 1, bytes([i % 256]) * 1000) for i in range(400)]
    stream = b"".join(msgs)
    reader = MessageReader(LIMIT)
    got: list[bytes] = []
    biggest = 0
    for i in range(0, len(stream), 7001):
        reader.feed(stream[i : i + 7001])
        got += drain(reader)
        biggest = max(biggest, len(reader._buf))
    assert got == msgs
    assert reader.buffered == 0
    assert biggest < 200_000, biggest


# -- size limits -------------------------------------------------------------------------


def huge_header(body_len: int, little: bool = True) -> bytes:
    e = "<" if little else ">"
    return struct.pack(e + "BBBBIII", ord("l" if little else "B"), 1, 0, 1, body_len, 1, 0)


@pytest.mark.parametrize("little", [True, False])
def test_claimed_size_is_not_allocated(little: bool) -> None:
    """16 bytes of a message claiming 127 MiB: nothing is reserved for the rest."""
    reader = MessageReader(LIMIT)
    tracemalloc.start()
    try:
        reader.feed(huge_header(127 * 1024 * 1024, little))
        assert reader.next_message() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.buffered == 16
    assert reader.wanted() == 127 * 1024 * 1024
    assert peak < 64 * 1024


@pytest.mark.parametrize("little", [True, False])
def test_header_claiming_more_than_the_limit(little: bool) -> None:
    reader = MessageReader(1024 * 1024)
    reader.feed(huge_header(127 * 1024 * 1024, little))
    with pytest.raises(FramingError, match=r"133169168 bytes exceeds the limit of 1048576"):
        reader.next_message()
    assert reader.buffered == 16


def test_header_claiming_more_than_the_spec_limit() -> None:
    reader = MessageReader(LIMIT)
    reader.feed(huge_header(LIMIT))
    with pytest.raises(FramingError, match="exceeds the limit"):
        reader.next_message()


def test_limit_is_inclusive() -> None:
    msg = le_message(1, b"x" * 50)
    at_limit = MessageReader(len(msg))
    at_limit.feed(msg)
    assert at_limit.next_message() == (msg, [])
    over = MessageReader(len(msg) - 1)
    over.feed(msg[:16])
    with pytest.raises(FramingError):
        over.next_message()


def test_limit_checked_for_later_messages_too() -> None:
    small = le_message(1)
    reader = MessageReader(len(small) + 8)
    reader.feed(small + huge_header(1000))
    assert reader.next_message() == (small, [])
    with pytest.raises(FramingError):
        reader.next_message()


@pytest.mark.parametrize("first", [b"x", b"\0", b"L"])
def test_bad_endianness_in_stream(first: bytes) -> None:
    reader = MessageReader(LIMIT)
    reader.feed(le_message(1) + first + le_message(2)[1:])
    assert reader.next_message() is not None
    with pytest.raises(MessageError, match="endianness"):
        reader.next_message()


def test_bad_version_in_stream() -> None:
    msg = bytearray(le_message(1))
    msg[3] = 2
    reader = MessageReader(LIMIT)
    reader.feed(msg)
    with pytest.raises(MessageError, match="version"):
        reader.next_message()


# -- unix fds ----------------------------------------------------------------------------


@pytest.fixture
def pipes() -> Iterator[list[int]]:
    fds: list[int] = []
    for _ in range(3):
        fds.extend(os.pipe())
    identity = {fd: _identity(fd) for fd in fds}
    yield fds
    for fd in fds:
        # Close only what is still our pipe: a number the reader closed may be reused.
        if _identity(fd) == identity[fd]:
            os.close(fd)


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st_ = os.fstat(fd)
    except OSError:
        return None
    return st_.st_dev, st_.st_ino


def test_fds_claimed_by_their_message(pipes: list[int]) -> None:
    first = be_message(1, "WithFds", unix_fds=2)
    second = le_message(2, unix_fds=1)
    reader = MessageReader(LIMIT)
    reader.feed(first, pipes[:2])
    reader.feed(second, pipes[2:3])
    data, _ = reader.next_message() or (b"", [])
    assert data == first
    assert reader.take_fds(parse_header(data).unix_fds) == pipes[:2]
    data, _ = reader.next_message() or (b"", [])
    assert data == second
    assert reader.take_fds(parse_header(data).unix_fds) == pipes[2:3]
    reader.check_no_stray_fds()


def test_too_few_fds(pipes: list[int]) -> None:
    reader = MessageReader(LIMIT)
    reader.feed(le_message(1, unix_fds=3), pipes[:2])
    assert reader.next_message() is not None
    with pytest.raises(FramingError, match="declares 3 unix fds but only 2 arrived"):
        reader.take_fds(3)


def test_stray_fds(pipes: list[int]) -> None:
    reader = MessageReader(LIMIT)
    reader.feed(le_message(1), pipes[:1])
    assert reader.next_message() is not None
    assert reader.take_fds(0) == []
    with pytest.raises(FramingError, match="1 unix fds arrived with no message"):
        reader.check_no_stray_fds()


def test_fds_with_a_partial_message_are_not_stray(pipes: list[int]) -> None:
    msg = le_message(1, unix_fds=1)
    reader = MessageReader(LIMIT)
    reader.feed(msg[:20], pipes[:1])
    assert reader.next_message() is None
    reader.check_no_stray_fds()
    reader.feed(msg[20:])
    assert reader.next_message() == (msg, [])
    assert reader.take_fds(1) == pipes[:1]
    reader.check_no_stray_fds()


def test_more_fds_than_a_message_may_carry() -> None:
    fake = list(range(10**6, 10**6 + 300))  # never real fds; close() is not called here
    reader = MessageReader(LIMIT)
    reader.feed(le_message(1, unix_fds=MAX_FDS_PER_MESSAGE + 1), fake)
    assert reader.next_message() is not None
    with pytest.raises(FramingError, match="more than allowed"):
        reader.take_fds(MAX_FDS_PER_MESSAGE + 1)
    assert reader.take_fds(MAX_FDS_PER_MESSAGE) == fake[:MAX_FDS_PER_MESSAGE]


def test_too_many_queued_fds() -> None:
    fake = list(range(10**6, 10**6 + MAX_QUEUED_FDS + 1))
    reader = MessageReader(LIMIT)
    reader.feed(b"", fake[:MAX_QUEUED_FDS])
    with pytest.raises(FramingError, match="too many unix fds"):
        reader.feed(b"", fake[MAX_QUEUED_FDS:])


def test_close_closes_held_fds(pipes: list[int]) -> None:
    reader = MessageReader(LIMIT)
    reader.feed(le_message(1, unix_fds=4)[:30], pipes[:4])
    reader.feed(b"", pipes[4:])
    assert all(fd_is_open(fd) for fd in pipes)
    reader.close()
    assert not any(fd_is_open(fd) for fd in pipes)
    assert reader.buffered == 0
    reader.close()  # idempotent


def test_close_leaves_claimed_fds_alone(pipes: list[int]) -> None:
    reader = MessageReader(LIMIT)
    reader.feed(le_message(1, unix_fds=1), pipes[:3])
    assert reader.next_message() is not None
    assert reader.take_fds(1) == pipes[:1]
    reader.close()
    assert fd_is_open(pipes[0])
    assert not fd_is_open(pipes[1])
    assert not fd_is_open(pipes[2])


# -- reading large messages straight into their own buffer ----------------------------------


def _read_into(reader: MessageReader, source: bytes, pos: int, step: int) -> int:
    """Emulate recv_into: copy up to ``step`` bytes of ``source`` into the reader's target."""
    target = reader.read_target()
    assert target is not None
    k = min(step, len(target), len(source) - pos)
    target[:k] = source[pos : pos + k]
    reader.filled(k)
    return pos + k


@pytest.mark.parametrize("size", [100_000, 3 * 1024 * 1024])
def test_large_message_read_into_its_buffer_then_the_rest_normally(size: int) -> None:
    big = le_message(1, b"B" * size)
    after = le_message(2, b"after")
    stream = big + after
    reader = MessageReader(LIMIT)
    pos = 20_000
    reader.feed(stream[:pos])
    assert reader.next_message() is None
    got: list[bytes] = []
    while reader.read_target() is None:  # until 4x what arrived + 256 KiB covers it
        reader.feed(stream[pos : pos + 50_000])
        pos += 50_000
        assert reader.next_message() is None
    assert len(big) <= 4 * pos + 256 * 1024
    while True:
        target = reader.read_target()
        if target is None:
            break
        assert len(target) == len(big) - pos  # a read never goes past the message's end
        pos = _read_into(reader, stream, pos, 70_000)
        got += drain(reader)
    assert got == [big]
    assert pos == len(big)
    reader.feed(stream[pos:])
    assert list(drain(reader)) == [after]
    assert reader.buffered == 0


def test_large_message_completed_by_a_normal_read_keeps_what_follows() -> None:
    big = le_message(1, b"C" * 200_000)
    after = le_message(2, b"x")
    stream = big + after
    reader = MessageReader(LIMIT)
    reader.feed(stream[:70_000])
    assert reader.next_message() is None
    assert reader.read_target() is not None
    # The owner read normally anyway (e.g. a read already in flight): feed still works.
    reader.feed(stream[70_000:])
    assert list(drain(reader)) == [big, after]
    assert reader.buffered == 0


def test_no_target_for_small_or_nearly_complete_messages() -> None:
    small = le_message(1, b"s" * 30_000)
    reader = MessageReader(LIMIT)
    reader.feed(small[:100])
    assert reader.next_message() is None
    assert reader.read_target() is None
    big = le_message(2, b"b" * 100_000)
    reader = MessageReader(LIMIT)
    reader.feed(big[: len(big) - 1000])
    assert reader.next_message() is None
    assert reader.read_target() is None  # 1000 bytes to go: a normal read is fine
    reader.feed(big[len(big) - 1000 :])
    assert list(drain(reader)) == [big]


@pytest.mark.parametrize("claim", [2 * 1024 * 1024, 127 * 1024 * 1024])
def test_a_claim_alone_does_not_allocate_the_claimed_size(claim: int) -> None:
    """16 bytes claiming 2 or 127 MiB: no target (it would reserve the claimed size);
    the target comes once 4x the bytes received + 256 KiB cover the message."""
    reader = MessageReader(LIMIT)
    reader.feed(huge_header(claim))
    assert reader.next_message() is None
    assert reader.read_target() is None
    received = 16
    chunk = b"\0" * 65536
    while reader.read_target() is None:
        assert 4 * received + 256 * 1024 < claim + 16
        reader.feed(chunk)
        received += len(chunk)
        assert reader.next_message() is None
    assert claim + 16 <= 4 * received + 256 * 1024


def test_fds_that_arrive_during_a_large_message_belong_to_it(pipes: list[int]) -> None:
    big = le_message(1, b"F" * 150_000, unix_fds=2)
    reader = MessageReader(LIMIT)
    reader.feed(big[:70_000], pipes[:2])
    assert reader.next_message() is None
    reader.check_no_stray_fds()  # held for the partial message
    pos = 70_000
    while reader.read_target() is not None:
        pos = _read_into(reader, big, pos, 40_000)
        reader.check_no_stray_fds()
    item = reader.next_message()
    assert item is not None and item[0] == big
    assert reader.take_fds(2) == pipes[:2]


def test_close_drops_a_large_message_in_progress() -> None:
    big = le_message(1, b"D" * 200_000)
    reader = MessageReader(LIMIT)
    reader.feed(big[:70_000])
    assert reader.next_message() is None
    assert reader.read_target() is not None
    reader.close()
    assert reader.buffered == 0
    assert reader.next_message() is None
