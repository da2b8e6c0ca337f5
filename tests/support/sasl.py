"""The one hand-written SASL EXTERNAL client of the tests and benchmarks.

Raw clients (tests/support/rawconn.py, hostile tests, benchmarks timing each phase) speak the
handshake themselves; these build its lines and run it on a blocking socket.
"""

from __future__ import annotations

import os
import socket

NEGOTIATE = b"NEGOTIATE_UNIX_FD\r\n"
BEGIN = b"BEGIN\r\n"


def auth_line(uid: int | None = None) -> bytes:
    """``AUTH EXTERNAL <hex uid>`` with CRLF (our uid unless ``uid``)."""
    uid = os.getuid() if uid is None else uid
    return b"AUTH EXTERNAL " + str(uid).encode().hex().encode() + b"\r\n"


def opening(uid: int | None = None, *, fds: bool = False, begin: bool = True) -> bytes:
    """The whole client side sent at once: NUL, AUTH, [NEGOTIATE_UNIX_FD], [BEGIN]."""
    return b"\0" + auth_line(uid) + (NEGOTIATE if fds else b"") + (BEGIN if begin else b"")


def read_line(sock: socket.socket) -> bytes:
    """One server line (CRLF included), b'' on EOF; the server says nothing more until
    the client speaks again, so reading past the line cannot happen."""
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            return line
        line += chunk
    return line


def authenticate(
    sock: socket.socket, uid: int | None = None, *, fds: bool = False, begin: bool = True
) -> str:
    """Run the handshake line by line on a blocking socket; return the server's guid.
    Raises ConnectionError naming what the server said when it refuses."""
    sock.sendall(b"\0" + auth_line(uid))
    line = read_line(sock)
    if not line.startswith(b"OK "):
        raise ConnectionError(f"auth refused: {line!r}")
    if fds:
        sock.sendall(NEGOTIATE)
        agree = read_line(sock)
        if agree != b"AGREE_UNIX_FD\r\n":
            raise ConnectionError(f"fd passing refused: {agree!r}")
    if begin:
        sock.sendall(BEGIN)
    return line[3:].strip().decode()
