"""Server side of the D-Bus SASL handshake, toward a confined client (sans-I/O).

Only EXTERNAL is offered; the uid a client claims must be the uid the kernel
reported for its socket. Tolerates what real clients send: pipelined lines, the
uid inline or in a later DATA (empty DATA means "take it from the socket"), a
bare AUTH probe, NEGOTIATE_UNIX_FD, trailing blanks after BEGIN.
"""

from __future__ import annotations

import enum
import re

#: Longest line accepted, CRLF included (dbus-daemon uses 16 KiB as well).
MAX_LINE = 16 * 1024
#: Commands accepted before BEGIN; a client still talking after this is hostile.
MAX_COMMANDS = 64
#: Rejected attempts before we give up (dbus-daemon also stops after a few).
MAX_REJECTS = 6


class SaslError(Exception):
    """The client broke the handshake; close its connection and log the reason."""


class _State(enum.Enum):
    WAIT_NUL = 0
    WAIT_AUTH = 1
    WAIT_DATA = 2
    WAIT_BEGIN = 3
    DONE = 4


_LINE = re.compile(rb"[\t\x20-\x7e]*")


def _valid_line(line: bytes) -> bool:
    """Printable ASCII plus space and TAB only."""
    return _LINE.fullmatch(line) is not None


def _decode_uid(hex_arg: str) -> int | None:
    """EXTERNAL's initial response: the uid as decimal ASCII, hex encoded."""
    try:
        text = bytes.fromhex(hex_arg).decode("ascii")
    except ValueError:
        return None
    if not text.isdigit() or len(text) > 10:
        return None
    return int(text)


class SaslServer:
    """Feed client bytes in, get the bytes to answer; ``done`` once BEGIN arrived."""

    def __init__(self, peer_uid: int, guid: str, unix_fd_possible: bool = True) -> None:
        """``peer_uid`` comes from SO_PEERCRED; ``guid`` is the server's own."""
        self.peer_uid = peer_uid
        self.guid = guid
        self.unix_fd_possible = unix_fd_possible
        self.negotiated_unix_fd = False
        self.authenticated_uid: int | None = None
        self.leftover = b""
        self._state = _State.WAIT_NUL
        self._buf = bytearray()
        self._commands = 0
        self._rejects = 0

    @property
    def done(self) -> bool:
        """True once BEGIN was accepted; ``leftover`` then holds the first message bytes."""
        return self._state is _State.DONE

    def feed(self, data: bytes) -> bytes:
        """Consume bytes from the client; return the reply lines to send back."""
        if self._state is _State.DONE:
            raise SaslError("handshake already finished")
        self._buf += data
        out = bytearray()
        if self._state is _State.WAIT_NUL:
            if not self._buf:
                return b""
            if self._buf[0] != 0:
                raise SaslError("bytes before the leading NUL byte")
            del self._buf[0]
            self._state = _State.WAIT_AUTH
        while self._state is not _State.DONE:
            end = self._buf.find(b"\r\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:
                    raise SaslError(f"handshake line longer than {MAX_LINE} bytes")
                break
            if end + 2 > MAX_LINE:
                raise SaslError(f"handshake line longer than {MAX_LINE} bytes")
            line = bytes(self._buf[:end])
            del self._buf[: end + 2]
            if not _valid_line(line):
                raise SaslError("handshake line has non-ASCII or control bytes")
            self._commands += 1
            if self._commands > MAX_COMMANDS:
                raise SaslError(f"more than {MAX_COMMANDS} handshake commands")
            out += self._handle(line.decode("ascii"))
            if self._rejects > MAX_REJECTS:
                raise SaslError("too many rejected authentication attempts")
        if self._state is _State.DONE:
            self.leftover = bytes(self._buf)
            self._buf.clear()
        return bytes(out)

    def _reject(self) -> bytes:
        self._rejects += 1
        self._state = _State.WAIT_AUTH
        return b"REJECTED EXTERNAL\r\n"

    def _accept_uid(self, claimed: int | None) -> bytes:
        uid = self.peer_uid if claimed is None else claimed
        if uid != self.peer_uid:
            return self._reject()
        self.authenticated_uid = uid
        self._state = _State.WAIT_BEGIN
        return f"OK {self.guid}\r\n".encode("ascii")

    def _handle(self, line: str) -> bytes:
        parts = line.replace("\t", " ").split(" ", 1)
        cmd = parts[0]
        arg = parts[1].strip(" ") if len(parts) > 1 else ""
        state = self._state
        if cmd in ("CANCEL", "ERROR"):
            return self._reject()
        if state is _State.WAIT_AUTH:
            if cmd == "AUTH":
                mech, _, initial = arg.partition(" ")
                initial = initial.strip(" ")
                if mech != "EXTERNAL":
                    return self._reject()
                if not initial:
                    self._state = _State.WAIT_DATA
                    return b"DATA\r\n"
                uid = _decode_uid(initial)
                if uid is None:
                    return self._reject()
                return self._accept_uid(uid)
            if cmd == "BEGIN":
                return b"ERROR \"not authenticated yet\"\r\n"
            return b"ERROR \"unknown command\"\r\n"
        if state is _State.WAIT_DATA:
            if cmd == "DATA":
                if not arg:
                    return self._accept_uid(None)
                uid = _decode_uid(arg)
                if uid is None:
                    return self._reject()
                return self._accept_uid(uid)
            if cmd == "AUTH":
                return self._reject()
            return b"ERROR \"expected DATA\"\r\n"
        # WAIT_BEGIN
        if cmd == "BEGIN" and not arg:
            self._state = _State.DONE
            return b""
        if cmd == "NEGOTIATE_UNIX_FD" and not arg:
            if self.unix_fd_possible:
                self.negotiated_unix_fd = True
                return b"AGREE_UNIX_FD\r\n"
            return b"ERROR \"unix fd passing is not available\"\r\n"
        if cmd == "AUTH":
            return self._reject()
        return b"ERROR \"unknown command\"\r\n"
