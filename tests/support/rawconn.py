"""Raw blocking connections for hostile-client tests and benchmarks.

- ``RawConn``: a blocking unix-socket connection speaking SASL EXTERNAL by hand
  (tests/support/sasl.py), then messages with fds, decoded with dbus-fast;
- ``RawPeer``: a thread owning a well-known name on the real bus that answers calls;
- ``add_server``: AddServer over a RawConn.

Nothing here ever talks to anything but local unix sockets.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from dbus_fast import Message, MessageType

from tests.support.names import MANAGER, MANAGER_PATH
from tests.support.sasl import authenticate
from tests.support.wire import (
    DRIVER,
    DRIVER_PATH,
    NO_REPLY_EXPECTED,
    Received,
    Undecodable,
    declared_fds,
    decode,
    method_call,
    method_return,
    unix_path,
    wire_length,
)
from xdg_containers.anchor.program import received_fds


class RawConn:
    """A blocking connection to a unix socket: hand-made SASL, then raw messages."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        """Connect (no handshake yet); ``timeout`` is the default for every wait."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(unix_path(address))
        self.timeout = timeout
        self.buf = bytearray()
        self.fds: deque[int] = deque()
        self.backlog: deque[Received] = deque()
        self.serial = 0
        self.unique_name = ""
        self.eof = False
        self.guid = ""

    # -- handshake -----------------------------------------------------------------

    def handshake(self, fds: bool = False, uid: int | None = None) -> str:
        """NUL, AUTH EXTERNAL (inline uid), [NEGOTIATE_UNIX_FD], BEGIN; return the guid."""
        self.guid = authenticate(self.sock, uid, fds=fds)
        return self.guid

    def read_line(self, timeout: float | None = None) -> bytes:
        """One SASL line (CRLF included); b'' on EOF."""
        while b"\r\n" not in self.buf:
            if not self._fill(timeout):
                return b""
        end = self.buf.index(b"\r\n") + 2
        line = bytes(self.buf[:end])
        del self.buf[:end]
        return line

    def hello(self) -> str:
        """Hello; return the unique name."""
        serial = self.send_call(DRIVER, DRIVER_PATH, DRIVER, "Hello")
        reply = self.read_reply(serial)
        assert reply.msg.message_type == MessageType.METHOD_RETURN, reply.msg
        self.unique_name = str(reply.msg.body[0])
        return self.unique_name

    def setup(self, fds: bool = False) -> RawConn:
        """handshake + Hello."""
        self.handshake(fds)
        self.hello()
        return self

    # -- sending -------------------------------------------------------------------

    def next_serial(self) -> int:
        """The next serial of ours (1, 2, ...)."""
        self.serial += 1
        return self.serial

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Write bytes as they are; ``fds`` ride with the first byte."""
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sent = self.sock.sendmsg([data], anc)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def send_call(
        self, *call: Any, serial: int | None = None, flags: int = 0, fds: Sequence[int] = ()
    ) -> int:
        """Send a method call (``call``: wire.method_call's destination, path, interface,
        member[, sig, args]); return its serial."""
        serial = self.next_serial() if serial is None else serial
        self.send(method_call(serial, *call, flags=flags, unix_fds=len(fds)), fds)
        return serial

    def call(
        self, *call: Any, fds: Sequence[int] = (), timeout: float | None = None
    ) -> Received:
        """Send a call (as ``send_call``) and wait for its reply (other messages go to the
        backlog)."""
        return self.read_reply(self.send_call(*call, fds=fds), timeout)

    def driver(self, member: str, sig: str = "", args: Sequence[Any] = ()) -> Message:
        """Call the bus driver; the decoded reply."""
        return self.call(DRIVER, DRIVER_PATH, DRIVER, member, sig, args).msg

    # -- receiving -----------------------------------------------------------------

    def _fill(self, timeout: float | None) -> bool:
        """One recvmsg into the buffer; False on EOF. Raises TimeoutError."""
        if self.eof:
            return False
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        data, anc, _flags, _ = self.sock.recvmsg(
            1 << 20, socket.CMSG_SPACE(64 * 4), socket.MSG_CMSG_CLOEXEC
        )
        self.fds.extend(received_fds(anc))
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_message(self, timeout: float | None = None) -> Received | None:
        """The next message (backlog first); None on EOF; TimeoutError if none in time."""
        if self.backlog:
            return self.backlog.popleft()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if len(self.buf) >= 16:
                n = wire_length(self.buf)
                if len(self.buf) >= n:
                    raw = bytes(self.buf[:n])
                    del self.buf[:n]
                    try:
                        nfds = declared_fds(raw)
                    except (IndexError, struct.error, UnicodeDecodeError):
                        nfds = 0
                    fds = [self.fds.popleft() for _ in range(min(nfds, len(self.fds)))]
                    try:
                        msg = decode(raw)
                    except Exception as exc:
                        for fd in fds:
                            os.close(fd)
                        raise Undecodable(raw) from exc
                    return Received(raw, msg, fds)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message in time")
            if not self._fill(left):
                return None

    def next_message(self, timeout: float | None = None) -> Message:
        """The next decoded message (fds closed); EOFError when the connection closed."""
        r = self.read_message(timeout)
        if r is None:
            raise EOFError("connection closed")
        r.close_fds()
        return r.msg

    def read_reply(self, serial: int, timeout: float | None = None) -> Received:
        """Wait for the reply to ``serial``; other messages are kept in the backlog."""
        kept: list[Received] = []
        try:
            while True:
                r = self.read_message(timeout)
                if r is None:
                    raise EOFError(f"connection closed while waiting for the reply to {serial}")
                if r.msg.reply_serial == serial and r.msg.message_type in (
                    MessageType.METHOD_RETURN,
                    MessageType.ERROR,
                ):
                    return r
                kept.append(r)
        finally:
            self.backlog.extendleft(reversed(kept))

    def wait_eof(self, timeout: float = 5.0) -> bool:
        """True if the peer closes the connection within ``timeout`` (reads and drops data)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if not self._fill(left):
                    return True
                self.buf.clear()
        except TimeoutError:
            return False
        except OSError:
            return True  # ECONNRESET and the like: closed as well

    def still_open(self, wait: float = 0.3) -> bool:
        """True if no EOF arrives within ``wait`` seconds."""
        r, _, _ = select.select([self.sock], [], [], wait)
        if not r:
            return True
        try:
            data = self.sock.recv(65536, socket.MSG_PEEK)
        except OSError:
            return False
        return bool(data)

    def close(self) -> None:
        """Close the socket and any fds received but not handed out."""
        while self.fds:
            try:
                os.close(self.fds.popleft())
            except OSError:
                pass
        for r in self.backlog:
            r.close_fds()
        self.backlog.clear()
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_server(
    manager: RawConn,
    named: dict[str, tuple[str, Any]] | None = None,
    *,
    fds: Sequence[int] = (),
    instance: str = "hostile",
) -> tuple[str, str]:
    """AddServer over a raw bus connection; return (server path, socket address)."""
    reply = manager.call(
        MANAGER,
        MANAGER_PATH,
        MANAGER,
        "AddServer",
        "sssa{sv}a{sv}",
        ["org.example.Hostile", "org.example.App", instance, {}, dict(named or {})],
        fds=fds,
        timeout=10,
    )
    msg = reply.msg
    assert msg.message_type == MessageType.METHOD_RETURN, f"{msg.error_name}: {msg.body}"
    path, results = msg.body
    return str(path), str(results["Address"].value)


# ----------------------------------------------------------------------------------------
# a peer on the real bus


Handler = Callable[["RawPeer", Received], "list[Any] | tuple[float, list[Any]] | None"]


class RawPeer:
    """A thread on the real bus owning ``name``, answering calls with ``handler``.

    ``handler(peer, call)`` returns the messages to send, or ``(delay, messages)`` to send
    them ``delay`` seconds later, or None. The default handler echoes the body back.
    """

    def __init__(
        self, bus_address: str, name: str | None = None, handler: Handler | None = None
    ) -> None:
        """Connect, Hello, RequestName; start answering."""
        self.conn = RawConn(bus_address, timeout=10)
        self.conn.setup(fds=True)
        self.name = name
        if name is not None:
            reply = self.conn.driver("RequestName", "su", [name, 4])
            assert reply.body == [1], reply
        self.handler = handler or echo_handler
        self.calls: list[Received] = []
        self.errors: list[str] = []
        self.died = ""
        self._due: list[tuple[float, list[bytes]]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def reply_serial(self) -> int:
        """A serial for a message the peer sends."""
        with self._lock:
            return self.conn.next_serial()

    def send(self, data: bytes | tuple[bytes, list[int]]) -> None:
        """Send a message (from any thread); ``(bytes, fds)`` sends fds and closes them."""
        fds: list[int] = []
        if isinstance(data, tuple):
            data, fds = data
        try:
            with self._lock:
                self.conn.send(data, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            due = [d for d in self._due if d[0] <= now]
            self._due = [d for d in self._due if d[0] > now]
            for _, msgs in due:
                for m in msgs:
                    self.send(m)
            wait = min([d[0] for d in self._due], default=now + 0.05) - now
            try:
                r = self.conn.read_message(timeout=max(0.001, min(wait, 0.05)))
            except TimeoutError:
                continue
            except Undecodable as exc:
                self.errors.append(repr(exc))
                continue
            except OSError as exc:
                self.died = repr(exc)
                return
            if r is None:
                self.died = "the bus closed the peer's connection"
                return
            try:
                if r.msg.message_type != MessageType.METHOD_CALL:
                    continue
                self.calls.append(r)
                try:
                    out = self.handler(self, r)
                except Exception as exc:  # a hostile call must not kill the peer
                    self.errors.append(repr(exc))
                    continue
            finally:
                r.close_fds()  # the handler may have taken some (set r.fds = [])
            if out is None:
                continue
            if isinstance(out, tuple):
                delay, msgs = out
                self._due.append((time.monotonic() + delay, msgs))
            else:
                for m in out:
                    self.send(m)

    def stop(self) -> None:
        """Stop the thread and close the connection."""
        self._stop.set()
        self._thread.join(5)
        self.conn.close()


def echo_handler(peer: RawPeer, call: Received) -> list[bytes] | None:
    """Answer every call that wants a reply: a string argument comes back as it was, any
    other body is answered with an empty return (a hostile body is never echoed, so the
    peer never sends anything the bus would disconnect it for)."""
    msg = call.msg
    if msg.flags & NO_REPLY_EXPECTED or not msg.sender:
        return None
    if msg.signature == "s":
        return [method_return(peer.reply_serial(), msg.serial, msg.sender, "s", [msg.body[0]])]
    return [method_return(peer.reply_serial(), msg.serial, msg.sender)]
