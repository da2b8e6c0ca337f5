"""Raw D-Bus wire tools for the hostile-client tests and benchmarks, and their self-tests.

Hostile clients must be able to say things no library lets them say: a header that lies
about its length, fds the header does not declare, big-endian messages, unknown header
fields, serials near 2^32. So this module marshals messages itself (both endiannesses,
any header field, any body) and talks to unix sockets with plain blocking sockets:

- ``marshal`` / ``build_message`` / ``method_call`` / ``signal`` / ``method_return``: bytes;
- ``RawConn``: a blocking unix-socket connection speaking SASL EXTERNAL by hand, then
  messages (with fds), decoding what arrives with dbus-fast's unmarshaller (so the tests
  never judge the service with the service's own parser);
- ``RawPeer``: a thread owning a well-known name on the real bus that answers calls;
- ``rss_kib`` / ``fd_count``: /proc numbers of the service process.

``benchmarks/fuzz_live.py`` and ``benchmarks/soak.py`` import this module too. Nothing here
ever talks to anything but local unix sockets.
"""

from __future__ import annotations

import array
import io
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast._private.unmarshaller import Unmarshaller

# Message types and header field codes (D-Bus specification).
METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
F_PATH, F_INTERFACE, F_MEMBER, F_ERROR_NAME = 1, 2, 3, 4
F_REPLY_SERIAL, F_DESTINATION, F_SENDER, F_SIGNATURE, F_UNIX_FDS = 5, 6, 7, 8, 9
NO_REPLY_EXPECTED = 0x1
NO_AUTO_START = 0x2

DRIVER = "org.freedesktop.DBus"
DRIVER_PATH = "/org/freedesktop/DBus"
MANAGER = "org.freedesktop.DBus.Containers1"
MANAGER_PATH = "/org/freedesktop/DBus/Containers1"
EXT = "org.freedesktop.XdgContainers1."

_ALIGN = {
    "y": 1,
    "g": 1,
    "v": 1,
    "n": 2,
    "q": 2,
    "b": 4,
    "i": 4,
    "u": 4,
    "h": 4,
    "s": 4,
    "o": 4,
    "a": 4,
    "x": 8,
    "t": 8,
    "d": 8,
    "(": 8,
    "{": 8,
}
_FIXED = {"n": "h", "q": "H", "b": "I", "i": "i", "u": "I", "h": "I", "x": "q", "t": "Q", "d": "d"}


# ----------------------------------------------------------------------------------------
# marshalling


def complete_types(sig: str) -> list[str]:
    """Split a signature into its complete types."""
    out: list[str] = []
    i = 0
    while i < len(sig):
        j = _type_end(sig, i)
        out.append(sig[i:j])
        i = j
    return out


def _type_end(sig: str, i: int) -> int:
    c = sig[i]
    if c == "a":
        return _type_end(sig, i + 1)
    if c in "({":
        close = ")" if c == "(" else "}"
        j = i + 1
        while sig[j] != close:
            j = _type_end(sig, j)
        return j + 1
    return i + 1


class _Writer:
    def __init__(self, little: bool) -> None:
        self.b = bytearray()
        self.e = "<" if little else ">"

    def align(self, n: int) -> None:
        self.b += b"\0" * (-len(self.b) % n)

    def value(self, t: str, v: Any) -> None:
        c = t[0]
        if c == "y":
            self.b.append(int(v) & 0xFF)
        elif c in _FIXED:
            self.align(_ALIGN[c])
            self.b += struct.pack(self.e + _FIXED[c], v)
        elif c in "so":
            raw = v.encode() if isinstance(v, str) else bytes(v)
            self.align(4)
            self.b += struct.pack(self.e + "I", len(raw)) + raw + b"\0"
        elif c == "g":
            raw = v.encode() if isinstance(v, str) else bytes(v)
            self.b += bytes([len(raw) & 0xFF]) + raw + b"\0"
        elif c == "v":
            vsig, vv = v
            self.value("g", vsig)
            self.value(vsig, vv)
        elif c == "a":
            elem = t[1:]
            self.align(4)
            at = len(self.b)
            self.b += b"\0\0\0\0"
            self.align(_ALIGN[elem[0]])
            start = len(self.b)
            if elem == "y" and isinstance(v, bytes | bytearray | memoryview):
                self.b += v
            else:
                for item in v.items() if isinstance(v, dict) else v:
                    self.value(elem, item)
            self.b[at : at + 4] = struct.pack(self.e + "I", len(self.b) - start)
        elif c in "({":
            self.align(8)
            for sub, item in zip(complete_types(t[1:-1]), v, strict=True):
                self.value(sub, item)
        else:
            raise ValueError(f"cannot marshal type {t!r}")


def marshal(sig: str, values: Sequence[Any], little: bool = True) -> bytes:
    """Marshal ``values`` (one per complete type of ``sig``) as a body starting at offset 0.

    Arrays are lists (dicts for ``a{..}``), structs tuples, variants ``(signature, value)``.
    """
    w = _Writer(little)
    for t, v in zip(complete_types(sig), values, strict=True):
        w.value(t, v)
    return bytes(w.b)


def build_message(
    mtype: int,
    serial: int,
    fields: Iterable[tuple[int, str, Any]],
    body: bytes = b"",
    *,
    flags: int = 0,
    little: bool = True,
    body_length: int | None = None,
    version: int = 1,
) -> bytes:
    """A whole message from raw header fields ``(code, signature, value)`` and body bytes.

    ``body_length`` overrides the length the fixed header claims (to lie about it).
    """
    w = _Writer(little)
    w.b += bytes([0x6C if little else 0x42, mtype, flags, version])
    w.b += struct.pack(w.e + "II", len(body) if body_length is None else body_length, serial)
    w.value("a(yv)", [(code, (sig, value)) for code, sig, value in fields])
    w.align(8)
    return bytes(w.b) + body


def _routing(
    path: str | None = None,
    interface: str | None = None,
    member: str | None = None,
    destination: str | None = None,
    sig: str = "",
    unix_fds: int = 0,
) -> list[tuple[int, str, Any]]:
    fields: list[tuple[int, str, Any]] = []
    if path is not None:
        fields.append((F_PATH, "o", path))
    if interface is not None:
        fields.append((F_INTERFACE, "s", interface))
    if member is not None:
        fields.append((F_MEMBER, "s", member))
    if destination is not None:
        fields.append((F_DESTINATION, "s", destination))
    if sig:
        fields.append((F_SIGNATURE, "g", sig))
    if unix_fds:
        fields.append((F_UNIX_FDS, "u", unix_fds))
    return fields


def method_call(
    serial: int,
    destination: str | None,
    path: str,
    interface: str | None,
    member: str,
    sig: str = "",
    args: Sequence[Any] = (),
    *,
    flags: int = 0,
    little: bool = True,
    unix_fds: int = 0,
) -> bytes:
    """A METHOD_CALL."""
    body = marshal(sig, args, little) if sig else b""
    fields = _routing(path, interface, member, destination, sig, unix_fds)
    return build_message(METHOD_CALL, serial, fields, body, flags=flags, little=little)


def driver_call(
    serial: int, member: str, sig: str = "", args: Sequence[Any] = (), **kw: Any
) -> bytes:
    """A call to the bus driver."""
    return method_call(serial, DRIVER, DRIVER_PATH, DRIVER, member, sig, args, **kw)


def signal(
    serial: int,
    path: str,
    interface: str,
    member: str,
    sig: str = "",
    args: Sequence[Any] = (),
    *,
    destination: str | None = None,
    little: bool = True,
) -> bytes:
    """A SIGNAL (broadcast unless ``destination``)."""
    body = marshal(sig, args, little) if sig else b""
    fields = _routing(path, interface, member, destination, sig)
    return build_message(SIGNAL, serial, fields, body, little=little)


def method_return(
    serial: int,
    reply_serial: int,
    destination: str | None,
    sig: str = "",
    args: Sequence[Any] = (),
    *,
    body: bytes | None = None,
    little: bool = True,
) -> bytes:
    """A METHOD_RETURN (``body`` given as bytes wins over ``sig``/``args`` marshalling)."""
    if body is None:
        body = marshal(sig, args, little) if sig else b""
    fields: list[tuple[int, str, Any]] = [(F_REPLY_SERIAL, "u", reply_serial)]
    if destination is not None:
        fields.append((F_DESTINATION, "s", destination))
    if sig:
        fields.append((F_SIGNATURE, "g", sig))
    return build_message(METHOD_RETURN, serial, fields, body, little=little)


def error_message(
    serial: int, reply_serial: int, destination: str | None, name: str, text: str = ""
) -> bytes:
    """An ERROR reply."""
    fields: list[tuple[int, str, Any]] = [
        (F_ERROR_NAME, "s", name),
        (F_REPLY_SERIAL, "u", reply_serial),
    ]
    if destination is not None:
        fields.append((F_DESTINATION, "s", destination))
    fields.append((F_SIGNATURE, "g", "s"))
    return build_message(ERROR, serial, fields, marshal("s", [text]))


def wire_length(buf: bytes | bytearray, pos: int = 0) -> int:
    """Total length of the message at ``pos`` from its fixed header (our own reading)."""
    e = "<" if buf[pos] == 0x6C else ">"
    body_len, _serial, fields_len = struct.unpack_from(e + "III", buf, pos + 4)
    end = 16 + fields_len
    return int(end + (-end % 8) + body_len)


# ----------------------------------------------------------------------------------------
# connections


class Undecodable(ValueError):
    """A whole message arrived that dbus-fast cannot read (it has been consumed)."""

    def __init__(self, raw: bytes) -> None:
        super().__init__(f"undecodable message {raw[:48]!r}...")
        self.raw = raw


@dataclass
class Received:
    """One message read off a socket: raw bytes, dbus-fast's decoding, the fds that came."""

    raw: bytes
    msg: Message
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        """Close the fds that arrived with the message."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def decode(raw: bytes) -> Message:
    """dbus-fast's reading of one whole message."""
    msg = Unmarshaller(io.BytesIO(raw), None, True).unmarshall()  # type: ignore[arg-type]
    assert msg is not None, "incomplete message"
    return msg


def unix_path(address: str) -> str:
    """The socket path of a ``unix:path=...`` address (or a path as is)."""
    if "path=" not in address:
        return address
    return address.split("path=", 1)[1].split(",", 1)[0]


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
        uid = os.getuid() if uid is None else uid
        out = b"\0AUTH EXTERNAL " + str(uid).encode().hex().encode() + b"\r\n"
        self.sock.sendall(out)
        line = self.read_line()
        if not line.startswith(b"OK "):
            raise ConnectionError(f"auth refused: {line!r}")
        self.guid = line[3:].strip().decode()
        if fds:
            self.sock.sendall(b"NEGOTIATE_UNIX_FD\r\n")
            agree = self.read_line()
            if agree != b"AGREE_UNIX_FD\r\n":
                raise ConnectionError(f"fd passing refused: {agree!r}")
        self.sock.sendall(b"BEGIN\r\n")
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
        self,
        destination: str | None,
        path: str,
        interface: str | None,
        member: str,
        sig: str = "",
        args: Sequence[Any] = (),
        *,
        serial: int | None = None,
        flags: int = 0,
        fds: Sequence[int] = (),
    ) -> int:
        """Send a method call; return its serial."""
        serial = self.next_serial() if serial is None else serial
        self.send(
            method_call(
                serial,
                destination,
                path,
                interface,
                member,
                sig,
                args,
                flags=flags,
                unix_fds=len(fds),
            ),
            fds,
        )
        return serial

    def call(
        self,
        destination: str | None,
        path: str,
        interface: str | None,
        member: str,
        sig: str = "",
        args: Sequence[Any] = (),
        *,
        fds: Sequence[int] = (),
        timeout: float | None = None,
    ) -> Received:
        """Send a call and wait for its reply (other messages go to the backlog)."""
        serial = self.send_call(destination, path, interface, member, sig, args, fds=fds)
        return self.read_reply(serial, timeout)

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
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % 4])
                self.fds.extend(arr)
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
                        nfds = _declared_fds(raw)
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


def _declared_fds(raw: bytes) -> int:
    """The UNIX_FDS header field, read by hand (dbus-fast keeps fds, not the count)."""
    e = "<" if raw[0] == 0x6C else ">"
    fields_len = struct.unpack_from(e + "I", raw, 12)[0]
    pos, end = 16, 16 + fields_len
    while pos < end:
        pos += -pos % 8
        if pos >= end:
            break
        code, siglen = raw[pos], raw[pos + 1]
        sig = raw[pos + 2 : pos + 2 + siglen].decode()
        pos += 3 + siglen
        if sig in ("s", "o"):
            pos += -pos % 4
            n = struct.unpack_from(e + "I", raw, pos)[0]
            pos += 5 + n
        elif sig == "g":
            pos += raw[pos] + 2
        elif sig == "u":
            pos += -pos % 4
            if code == F_UNIX_FDS:
                return int(struct.unpack_from(e + "I", raw, pos)[0])
            pos += 4
        else:
            return 0
    return 0


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


# ----------------------------------------------------------------------------------------
# the service process


def rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    """Open fds of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def stable_fd_count(pid: int, timeout: float = 5.0) -> int:
    """Open fds of a process once two readings 50 ms apart agree."""
    deadline = time.monotonic() + timeout
    last = fd_count(pid)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = fd_count(pid)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the fd count of {pid} did not settle")


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``predicate`` until true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


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
    assert _declared_fds(raw) == 0
    assert _declared_fds(method_call(1, None, "/", None, "M", unix_fds=3)) == 3
