"""SPEC 12 limits outside the budget itself: the config keys, the reader's fd limit, its
progress counter and reservation, and the selector's last resort against a failing fd."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

import pytest

from xdg_containers.config import Limits, load_config
from xdg_containers.io.dispatch import direct_selector, new_event_loop
from xdg_containers.wire.framing import FramingError, MessageReader

MiB = 1024 * 1024


def test_new_limits_have_documented_defaults() -> None:
    limits = Limits()
    assert limits.max_fds_per_connection == 64  # dbus-daemon's max_incoming_unix_fds
    assert limits.idle_partial_message_timeout == 30000
    assert limits.max_buffered_bytes == 512 * MiB


def test_new_limits_can_be_overridden() -> None:
    limits = load_config(
        None,
        {
            "max_fds_per_connection": "8",
            "idle-partial-message-timeout": "500",
            "max_buffered_bytes": str(64 * MiB),
        },
    )
    assert (
        limits.max_fds_per_connection,
        limits.idle_partial_message_timeout,
        limits.max_buffered_bytes,
    ) == (8, 500, 64 * MiB)


def header(body_len: int) -> bytes:
    return struct.pack("<BBBBIII", ord("l"), 1, 0, 1, body_len, 1, 0)


def test_more_fds_than_max_fds_close_the_stream() -> None:
    reader = MessageReader(128 * MiB, max_fds=4)
    reader.feed(header(100), [10**6 + i for i in range(4)])
    with pytest.raises(FramingError, match="over max_fds_per_connection=4"):
        reader.feed(b"x", [10**6 + 5])


def test_progress_counts_feeds_and_fills() -> None:
    reader = MessageReader(128 * MiB)
    reader.feed(header(8 * MiB))
    first = reader.progress
    reader.feed(b"\0" * (4 * MiB))
    assert reader.progress > first
    assert reader.next_message() is None  # learns the length
    target = reader.read_target()
    assert target is not None and reader.filling
    before = reader.progress
    reader.filled(10)
    assert reader.progress > before


def test_reservation_announces_what_read_target_takes() -> None:
    reader = MessageReader(128 * MiB)
    reader.feed(header(64 * MiB) + b"\0" * MiB)
    assert reader.next_message() is None  # learns the length
    assert reader.reservation() == 0  # 1 MiB arrived: 4x + 256 KiB is far from 64 MiB
    assert reader.read_target() is None and reader.allocated < 2 * MiB
    reader.feed(b"\0" * (16 * MiB))
    n = reader.reservation()
    assert n == 64 * MiB + 16
    assert reader.read_target() is not None
    assert reader.allocated == n and reader.filling and reader.reservation() == 0


def test_a_callback_failing_past_its_owner_is_unwatched_not_called_forever(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Level-triggered and never read: without the last resort it would run at every
    wake-up, a busy loop writing a traceback each time."""
    loop = new_event_loop()
    sel = direct_selector(loop)
    assert sel is not None
    a, b = socket.socketpair()
    a.setblocking(False)
    calls = []

    def bad() -> None:
        calls.append(1)
        raise RuntimeError("boom")

    sel.watch(a.fileno(), bad, None)
    b.send(b"x")
    try:
        with caplog.at_level(logging.ERROR):
            loop.run_until_complete(asyncio.sleep(0.2))
    finally:
        loop.close()
        a.close()
        b.close()
    assert calls == [1]
    assert "no longer watching fd" in caplog.text
