"""Split a byte stream (plus received unix fds) into whole D-Bus messages.

Sans-I/O: the caller feeds what ``recvmsg`` returned and takes complete
messages out. Memory follows the bytes really received, not the length a
header claims: a large message gets its full buffer (for reads straight into
it) only when that is at most four times what arrived plus 256 KiB (the size
of an ordinary read).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from xdg_containers.wire.header import FIXED_HEADER_LEN, MessageError, message_length

#: At most this many received-but-unclaimed fds are held per stream (unless told fewer).
MAX_QUEUED_FDS = 1024
#: The D-Bus specification's limit on fds in one message (dbus-daemon uses 253... or 16*4).
MAX_FDS_PER_MESSAGE = 253


#: Messages at least this large are handed out without a copy when possible.
_HANDOFF_MIN = 64 * 1024
#: A partly received message at least this large is read straight into its own buffer...
_INTO_MIN = 64 * 1024
#: ...when at least this much of it is still to come, and once its size is at most four
#: times what arrived plus this much (what an ordinary read allocates anyway): a
#: header's claim alone never reserves memory the sender has not matched with bytes.
_INTO_MIN_REST = 16 * 1024
_INTO_ALLOWANCE = 256 * 1024


class FramingError(MessageError):
    """The stream violates framing rules; the connection must be closed."""


class MessageReader:
    """Accumulates stream bytes and yields whole messages with their fds."""

    __slots__ = (
        "_big",
        "_big_fill",
        "_buf",
        "_fds",
        "_next_len",
        "_pos",
        "mark",
        "max_fds",
        "max_message_bytes",
        "progress",
    )

    def __init__(self, max_message_bytes: int, max_fds: int = MAX_QUEUED_FDS) -> None:
        """``max_message_bytes``: a header claiming more closes the stream; ``max_fds``:
        holding more received fds than this (messages not yet taken) closes it too."""
        self.max_message_bytes = max_message_bytes
        self.max_fds = max_fds
        # Bumped by every feed and fill: whether a partial message advanced is a
        # comparison with an earlier value (the idle partial message timeout).
        self.progress = 0
        self.mark = 0  # the owner's: ``progress`` when its idle deadline started
        self._buf = bytearray()
        self._pos = 0
        # A list, not a deque: nearly always empty, and a deque costs ~600 bytes even then.
        self._fds: list[int] = []
        self._next_len = 0
        # A large message being read straight into its own buffer (read_target).
        self._big: bytearray | None = None
        self._big_fill = 0

    def feed(self, data: bytes | bytearray | memoryview, fds: Iterable[int] = ()) -> None:
        """Append received bytes, and the fds that arrived with them."""
        self.progress += 1
        big = self._big
        if big is not None:
            # Complete the large message first; anything after it goes to the buffer.
            fill = self._big_fill
            k = min(len(big) - fill, len(data))
            big[fill : fill + k] = memoryview(data)[:k]
            self._big_fill = fill + k
            data = memoryview(data)[k:]
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        if data:
            self._buf += data
        self._add_fds(fds)

    def _add_fds(self, fds: Iterable[int]) -> None:
        self._fds.extend(fds)
        if len(self._fds) > self.max_fds:
            raise FramingError(
                f"too many unix fds held: {len(self._fds)} in messages not yet forwarded, "
                f"over max_fds_per_connection={self.max_fds}"
            )

    def read_target(self) -> memoryview | None:
        """Where the next read should land: the unreceived rest of a large message.

        Reading straight into the message's own buffer saves copying every byte
        once more, and such a read stops at the message's end, so fds that come
        with it belong to it. None when the next read should be a normal one.
        Call ``filled`` with what such a read returned.
        """
        big = self._big
        if big is not None:
            return memoryview(big)[self._big_fill :] if self._big_fill < len(big) else None
        n = self.reservation()
        if not n:
            return None
        avail = len(self._buf) - self._pos
        big = bytearray(n)
        big[:avail] = memoryview(self._buf)[self._pos :]
        # Everything buffered was part of this message (it is incomplete).
        self._buf = bytearray()
        self._pos = 0
        self._big = big
        self._big_fill = avail
        return memoryview(big)[avail:]

    def reservation(self) -> int:
        """The size of the buffer ``read_target`` would reserve now (0: none): lets the
        caller check a budget before the memory is committed."""
        if self._big is not None:
            return 0
        n = self._next_len  # known once next_message() saw the header
        if n < _INTO_MIN:
            return 0
        avail = len(self._buf) - self._pos
        if n - avail < _INTO_MIN_REST or n > 4 * avail + _INTO_ALLOWANCE:
            return 0
        return n

    def filled(self, nbytes: int, fds: Iterable[int] = ()) -> memoryview | None:
        """A read into ``read_target()``'s view returned ``nbytes`` bytes and ``fds``.

        Returns where the next read goes while the message is incomplete, None once
        it is complete (then take it with ``next_message``).
        """
        big = self._big
        assert big is not None and self._big_fill + nbytes <= len(big)
        self.progress += 1
        fill = self._big_fill = self._big_fill + nbytes
        if fds:
            self._add_fds(fds)
        return memoryview(big)[fill:] if fill < len(big) else None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out as messages."""
        if self._big is not None:
            return self._big_fill + len(self._buf) - self._pos
        return len(self._buf) - self._pos

    @property
    def allocated(self) -> int:
        """Bytes of memory this reader holds for data not handed out (a large message's
        whole buffer once reserved), for the service-wide budget."""
        big = self._big
        return len(self._buf) + (len(big) if big is not None else 0)

    @property
    def filling(self) -> bool:
        """A large message's full buffer is reserved and still being filled: reading
        more of it costs no more memory, and completing it frees the buffer."""
        big = self._big
        return big is not None and self._big_fill < len(big)

    def has_message(self) -> bool:
        """Whether a complete message is waiting to be taken."""
        if self._big is not None:
            return self._big_fill == len(self._big)
        avail = len(self._buf) - self._pos
        if avail < FIXED_HEADER_LEN:
            return False
        try:
            return avail >= (self._next_len or message_length(self._buf, self._pos))
        except MessageError:
            return True  # let next_message() report it

    def wanted(self) -> int:
        """Bytes that would complete the current message (0 when unknown)."""
        if self._big is not None:
            return len(self._big) - self._big_fill
        if self._next_len:
            return self._next_len - self.buffered
        return 0

    def next_message(self) -> tuple[bytes | bytearray, list[int]] | None:
        """Return the next complete message and its fds, or None if more bytes are needed."""
        big = self._big
        if big is not None:
            if self._big_fill < len(big):
                return None
            self._big = None
            self._big_fill = 0
            self._next_len = 0
            return big, []
        avail = len(self._buf) - self._pos
        if avail < FIXED_HEADER_LEN:
            self._compact()
            return None
        n = self._next_len
        if not n:
            n = message_length(self._buf, self._pos)
            if n > self.max_message_bytes:
                raise FramingError(
                    f"message of {n} bytes exceeds the limit of {self.max_message_bytes}"
                )
            if n < FIXED_HEADER_LEN:
                raise FramingError("message shorter than its fixed header")
            self._next_len = n
        if avail < n:
            self._compact()
            return None
        start = self._pos
        data: bytes | bytearray
        if start == 0 and n >= _HANDOFF_MIN:
            # A large message at the front: hand the buffer itself over and keep
            # only what follows it, instead of copying the message out.
            data = self._buf
            self._buf = bytearray(memoryview(data)[n:])
            del data[n:]
            self._next_len = 0
            return data, []
        buf = self._buf
        with memoryview(buf) as view:
            data = view[start : start + n].tobytes()
        self._next_len = 0
        if start + n == len(buf):
            buf.clear()  # frees it: an idle connection keeps no copy of its last message
            self._pos = 0
        else:
            self._pos = start + n
        return data, []

    def take_fds(self, count: int) -> list[int]:
        """Claim ``count`` received fds for the message just returned."""
        if count > MAX_FDS_PER_MESSAGE:
            raise FramingError(f"message declares {count} unix fds, more than allowed")
        if count > len(self._fds):
            raise FramingError(
                f"message declares {count} unix fds but only {len(self._fds)} arrived"
            )
        taken = self._fds[:count]
        del self._fds[:count]
        return taken

    def check_no_stray_fds(self) -> None:
        """Fds left over with no partial message to claim them are a protocol error."""
        if self._fds and self._big is None and self._pos == len(self._buf):
            raise FramingError(f"{len(self._fds)} unix fds arrived with no message declaring them")

    def _compact(self) -> None:
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def close(self) -> None:
        """Close every fd still held (the stream is going away)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._buf = bytearray()
        self._pos = 0
        self._big = None
        self._big_fill = 0
