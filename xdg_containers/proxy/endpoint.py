"""One non-blocking stream socket: reads with fds into a callback, writes a queue.

asyncio's transports cannot carry unix fds, so the proxy drives sockets with
``add_reader``/``add_writer`` itself. Writes are batched: everything queued
while a read is processed goes out in as few ``sendmsg`` calls as possible,
each message's fds riding with its first byte.
"""

from __future__ import annotations

import array
import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable

from ..core.fds import close_fds as close_fds
from ..wire.address import AddressError, parse_address
from .dispatch import direct_selector

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
_FD_SIZE = array.array("i").itemsize
#: Room for the fds of several messages in one read.
_ANC_SPACE = socket.CMSG_SPACE(512 * _FD_SIZE)
_MAX_BATCH_BUFFERS = 256
_MAX_BATCH_BYTES = 4 * 1024 * 1024
# Plain ints: testing an IntFlag member costs a microsecond per read.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)


class ConnectError(Exception):
    """No entry of a D-Bus address could be connected to (the message says why)."""


async def connect_address(loop: asyncio.AbstractEventLoop, address: str) -> socket.socket:
    """A non-blocking stream socket connected to the first reachable entry of ``address``."""
    try:
        entries = parse_address(address)
    except AddressError as exc:
        raise ConnectError(f"bad bus address: {exc}") from exc
    last: Exception | None = None
    for entry in entries:
        try:
            family, addr = entry.sockaddr()
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, addr)
            except BaseException:
                sock.close()
                raise
            return sock
        except (OSError, AddressError) as exc:
            last = exc
    raise ConnectError(f"cannot connect to the bus: {last}")


def connect_unix_now(path: str | bytes) -> socket.socket:
    """A non-blocking unix stream socket connected to ``path`` without waiting (a local
    bus accepts at once); OSError (the socket closed) when that is not possible."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _fds_from_ancillary(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % _FD_SIZE)])
            fds.extend(arr)
    return fds


class Endpoint:
    """A socket we proxy to or from."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_data: Callable[[bytes, list[int]], None],
        on_closed: Callable[[str], None],
        on_eof: Callable[[], None],
        *,
        later: bool = False,
    ) -> None:
        """``on_data`` gets every chunk read; ``on_eof`` a half-close; ``on_closed`` errors.

        ``later``: when several sockets are ready at once, serve this one after the
        others (see DispatchingSelector.watch).
        """
        self._later = later
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.on_data = on_data
        self.on_closed = on_closed
        self.on_eof = on_eof
        self.eof = False
        self.on_drained: Callable[[], None] | None = None
        # Set by the owner: the next read goes straight into this view, and its
        # result to on_filled instead of on_data (see MessageReader.read_target).
        self.into: memoryview | None = None
        self.on_filled: Callable[[int, list[int]], None] | None = None
        self.receive_fds = False
        self.closed = False
        self._reading = False
        self._writing = False
        # [memoryview, fds | None] per queued message; made when first needed and
        # dropped once drained (an idle connection's empty deque would cost ~600 bytes).
        self._queue: deque[list[object]] | None = None
        self.pending_bytes = 0
        self.pending_fds = 0  # fds in the queue (max_fds_per_connection backpressure)
        # Called after each write while set: the owner counts what it holds (budget.py).
        self.on_written: Callable[[], None] | None = None
        # What a callback run from this socket raised (then the socket failed): the
        # owner logs it once, with its traceback, in the line saying why it closed.
        self.fault: BaseException | None = None
        self._direct = direct_selector(loop)
        if self._direct is not None:
            # Drop a stale entry left by an earlier socket with this fd number.
            self._direct.watch(self.fd, None, None)

    def _watch(self) -> None:
        """Tell the dispatching selector which callbacks this socket wants now."""
        assert self._direct is not None
        self._direct.watch(
            self.fd,
            self._on_readable if self._reading else None,
            self._on_writable if self._writing else None,
            later=self._later,
        )

    # -- reading -----------------------------------------------------------------

    def start_reading(self) -> None:
        """Watch the socket for incoming data."""
        if not self._reading and not self.closed:
            self._reading = True
            if self._direct is not None:
                self._watch()
            else:
                self.loop.add_reader(self.fd, self._on_readable)

    def pause_reading(self) -> None:
        """Stop reading (backpressure); the kernel buffer then fills and the peer waits."""
        if self._reading:
            self._reading = False
            if self._direct is not None:
                self._watch()
            else:
                self.loop.remove_reader(self.fd)

    @property
    def reading(self) -> bool:
        """Whether the socket is being read."""
        return self._reading

    def read_now(self) -> None:
        """Read once without waiting for the loop (nothing happens if no data is there)."""
        if self._reading and not self.closed:
            self._on_readable()

    def _on_readable(self) -> None:
        # The boundary of everything a read sets off (the owner's parsing, filtering,
        # forwarding, closing): a fault in there costs this connection only, once.
        # (One try around it all, not a call more per read: try costs nothing.)
        try:
            # Normally a fresh chunk for on_data; when the owner set ``into``, straight into
            # that view (the rest of a large message), reported to on_filled.
            into = self.into
            data = b""
            try:
                if self.receive_fds:
                    if into is None:
                        data, anc, flags, _addr = self.sock.recvmsg(
                            READ_CHUNK, _ANC_SPACE, _MSG_CMSG_CLOEXEC
                        )
                        nbytes = len(data)
                    else:
                        nbytes, anc, flags, _addr = self.sock.recvmsg_into(
                            [into], _ANC_SPACE, _MSG_CMSG_CLOEXEC
                        )
                    fds = _fds_from_ancillary(anc) if anc else []
                    if flags & _MSG_CTRUNC:
                        close_fds(fds)
                        self._fail("too many unix fds in one read (control data truncated)")
                        return
                else:
                    if into is None:
                        data = self.sock.recv(READ_CHUNK)
                        nbytes = len(data)
                    else:
                        nbytes = self.sock.recv_into(into)
                    fds = []
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(f"read failed: {exc.strerror or exc}")
                return
            if not nbytes:
                close_fds(fds)
                self.pause_reading()
                self.eof = True
                self.on_eof()
                return
            if into is None:
                self.on_data(data, fds)
            else:
                self.into = None
                assert self.on_filled is not None
                self.on_filled(nbytes, fds)
        except Exception as exc:
            self._faulted(exc)

    def _faulted(self, exc: BaseException) -> None:
        """A bug of ours (or an injected fault) must cost this one connection, not leave
        it half-dead nor escape into the loop, where a level-triggered socket would call
        us again at once: the socket fails with ``fault`` set, and the owner's close
        logs it once, traceback included."""
        if self.closed:
            # Closed by the owner before the fault: nobody else will report it.
            log.error("internal error after the connection closed", exc_info=exc)
            return
        self.fault = exc
        try:
            self._fail("internal error")
        except Exception:
            log.exception("internal error while closing a faulty connection")
            self.close()

    # -- writing -----------------------------------------------------------------

    def queue(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        """Append one message (and the fds that travel with it) to the output."""
        if self.closed:
            if fds:
                close_fds(fds)
            return
        q = self._queue
        if q is None:
            q = self._queue = deque()
        if fds:
            q.append([memoryview(data), fds])
            self.pending_fds += len(fds)
        else:
            q.append([memoryview(data), None])
        self.pending_bytes += len(data)

    def send(self, data: bytes | memoryview) -> None:
        """Write fd-less bytes now if nothing waits before them, else queue them."""
        if self._queue or self.closed:
            self.queue(data)
            self.flush()
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fail(f"write failed: {exc.strerror or exc}")
            return
        if sent < len(data):
            self.queue(memoryview(data)[sent:])
            self._wait_writable()
        elif self.on_drained is not None:
            self.on_drained()

    def flush(self) -> None:
        """Write as much of the queue as the socket takes now; wait for the rest."""
        if self.closed or self._writing:
            return
        self._write_some()
        if self._queue and not self.closed:
            self._wait_writable()

    def _wait_writable(self) -> None:
        """Output is waiting: be called back when the socket takes more."""
        self._writing = True
        if self._direct is not None:
            self._watch()
        else:
            self.loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            self._write_some()
        except Exception as exc:
            self._faulted(exc)
            return
        if not self._queue and self._writing and not self.closed:
            self._writing = False
            if self._direct is not None:
                self._watch()
            else:
                self.loop.remove_writer(self.fd)

    def _write_some(self) -> None:
        q = self._queue
        if q is None:
            if self.on_drained is not None:
                self.on_drained()
            return
        while q:
            head = q[0]
            head_fds = head[1]
            buffers: list[memoryview] = []
            total = 0
            for item in q:
                if item[1] is not None and buffers:
                    break  # the next fds must ride with that message's first byte
                view = item[0]
                assert isinstance(view, memoryview)
                buffers.append(view)
                total += len(view)
                if len(buffers) >= _MAX_BATCH_BUFFERS or total >= _MAX_BATCH_BYTES:
                    break
            try:
                if head_fds is not None:
                    assert isinstance(head_fds, list)
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", head_fds))]
                    sent = self.sock.sendmsg(buffers, anc)
                elif len(buffers) == 1:
                    sent = self.sock.send(buffers[0])
                else:
                    sent = self.sock.sendmsg(buffers)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(f"write failed: {exc.strerror or exc}")
                return
            if head_fds is not None:
                assert isinstance(head_fds, list)
                close_fds(head_fds)
                self.pending_fds -= len(head_fds)
                head[1] = None
            self.pending_bytes -= sent
            partial = sent < total
            while sent:
                view = q[0][0]
                assert isinstance(view, memoryview)
                n = len(view)
                if sent >= n:
                    q.popleft()
                    sent -= n
                else:
                    q[0][0] = view[sent:]
                    sent = 0
            if partial:
                break
        if not q:
            self._queue = None
        if self.on_written is not None:
            self.on_written()
        if self.on_drained is not None:
            self.on_drained()

    @property
    def write_idle(self) -> bool:
        """Nothing left to write."""
        return not self._queue

    # -- closing -----------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if self.closed:
            return
        self.close()
        self.on_closed(reason)

    def close(self) -> None:
        """Stop watching the socket, drop queued output (closing its fds), close it."""
        if self.closed:
            return
        self.closed = True
        if self._direct is not None:
            self._reading = self._writing = False
            self._direct.watch(self.fd, None, None)
        else:
            if self._reading:
                self.loop.remove_reader(self.fd)
                self._reading = False
            if self._writing:
                self.loop.remove_writer(self.fd)
                self._writing = False
        q, self._queue = self._queue, None
        while q:
            item = q.popleft()
            fds = item[1]
            if isinstance(fds, list):
                close_fds(fds)
        self.pending_bytes = 0
        self.pending_fds = 0
        self.sock.close()
