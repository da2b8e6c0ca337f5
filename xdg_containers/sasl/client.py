"""Client side of the D-Bus SASL handshake, toward the real bus (sans-I/O).

The service authenticates as itself (EXTERNAL, its own uid). Everything is
pipelined, as sd-bus does: BEGIN and the first messages may follow AUTH before
the bus has said ``OK`` (the bus reads its lines in order); only messages
carrying fds wait for ``AGREE_UNIX_FD``.
"""

from __future__ import annotations

from xdg_containers.sasl.server import MAX_LINE, SaslError


class SaslClient:
    """Produces our handshake lines and checks the bus's answers."""

    def __init__(self, uid: int) -> None:
        """``uid``: the service's own uid, claimed with EXTERNAL."""
        self.uid = uid
        self.bus_guid: str | None = None
        self.want_unix_fd = False
        self.unix_fd_agreed = False
        self.leftover = b""
        self._buf = bytearray()
        self._begin_sent = False
        self._ok = False
        self._fd_answered = False

    def start(self) -> bytes:
        """The opening bytes: NUL and AUTH EXTERNAL with our uid inline."""
        return b"\0AUTH EXTERNAL " + str(self.uid).encode("ascii").hex().encode("ascii") + b"\r\n"

    def begin(self, negotiate_unix_fd: bool) -> bytes:
        """Lines that end the handshake, sent once the client itself sent BEGIN."""
        self.want_unix_fd = negotiate_unix_fd
        self._begin_sent = True
        return (b"NEGOTIATE_UNIX_FD\r\n" if negotiate_unix_fd else b"") + b"BEGIN\r\n"

    @property
    def may_send_messages(self) -> bool:
        """True once we sent BEGIN: fd-less messages may follow it at once.

        The bus's OK and its answer to NEGOTIATE_UNIX_FD may still be on their
        way; only messages carrying fds must wait for them (see ``done``). Should
        the bus refuse us, ``feed`` raises and the connection closes.
        """
        return self._begin_sent

    @property
    def done(self) -> bool:
        """True once the handshake is over, fd negotiation answered included."""
        return (
            self._begin_sent
            and self._ok
            and (self._fd_answered or not self.want_unix_fd)
        )

    def feed(self, data: bytes) -> None:
        """Consume the bus's answer lines; raise SaslError on anything but success."""
        self._buf += data
        while not self.done:
            end = self._buf.find(b"\r\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:
                    raise SaslError("bus sent an overlong handshake line")
                return
            line = bytes(self._buf[:end]).decode("ascii", "replace")
            del self._buf[: end + 2]
            self._handle(line)
            if not self._begin_sent and self._ok:
                # Nothing more is expected until we send BEGIN.
                if self._buf:
                    raise SaslError(f"bus sent unexpected data: {bytes(self._buf)[:40]!r}")
                return
        self.leftover = bytes(self._buf)
        self._buf.clear()

    def _handle(self, line: str) -> None:
        cmd, _, arg = line.partition(" ")
        if not self._ok:
            if cmd == "OK" and arg:
                self._ok = True
                self.bus_guid = arg.strip()
                return
            raise SaslError(f"bus refused authentication: {line[:200]!r}")
        if self.want_unix_fd and not self._fd_answered:
            if cmd == "AGREE_UNIX_FD":
                self.unix_fd_agreed = True
            elif cmd != "ERROR":
                raise SaslError(f"unexpected answer to NEGOTIATE_UNIX_FD: {line[:200]!r}")
            self._fd_answered = True
            return
        raise SaslError(f"unexpected handshake line from bus: {line[:200]!r}")
