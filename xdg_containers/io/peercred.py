"""Kernel-reported credentials of a unix socket peer, taken at accept time.

Python 3.11 lacks the newer constants, so the Linux values are spelled here.
A pidfd (SO_PEERPIDFD, Linux 6.5+) names the process race-free; where the
kernel lacks it we record none rather than opening one by pid (that would race).
uid, gid, pid and the pidfd are read at accept; the groups and the security
label, which the kernel fixed at connect time too, are read by ``complete``
when the client's first messages (its Hello) go to the bus: they are only
needed once it has a name, and the bus's answer is being waited for then.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from dataclasses import dataclass, field

SO_PEERSEC = 31
SO_PEERGROUPS = 59
SO_PEERPIDFD = 77
_UCRED = struct.Struct("iII")


@dataclass
class PeerCredentials:
    """What the kernel said about the process that connected."""

    pid: int
    uid: int
    gid: int
    groups: list[int] = field(default_factory=list)
    pidfd: int | None = None
    security_label: bytes | None = None
    completed: bool = False

    def complete(self, sock: socket.socket) -> None:
        """Read the groups and security label (both fixed at connect time); once."""
        if self.completed:
            return
        self.completed = True
        self.groups = _peer_groups(sock)
        self.security_label = _peer_security_label(sock)

    def close(self) -> None:
        """Release the pidfd."""
        if self.pidfd is not None:
            try:
                os.close(self.pidfd)
            except OSError:
                pass
            self.pidfd = None


def _peer_groups(sock: socket.socket) -> list[int]:
    size = 64 * 4
    for _ in range(4):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size *= 4
                continue
            return []
        arr = array.array("I")
        arr.frombytes(raw[: len(raw) - len(raw) % 4])
        return sorted(set(arr))
    return []


def _peer_pidfd(sock: socket.socket) -> int | None:
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        return None
    if fd < 0:
        return None
    return int(fd)  # the kernel makes it close-on-exec


def _peer_security_label(sock: socket.socket) -> bytes | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERSEC, 4096)
    except OSError:
        return None
    label = raw.rstrip(b"\0")
    if not label or label == b"unconfined":
        # AppArmor reports "unconfined" for processes without a profile;
        # dbus-daemon still passes it on, and so do we below.
        return label + b"\0" if label else None
    return label + b"\0"


def read_peer_credentials(sock: socket.socket, complete: bool = True) -> PeerCredentials:
    """SO_PEERCRED and the pidfd of a connected unix socket; with ``complete``, the
    groups and security label too (else ``PeerCredentials.complete`` reads them)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    creds = PeerCredentials(pid=pid, uid=uid, gid=gid, pidfd=_peer_pidfd(sock))
    if complete:
        creds.complete(sock)
    return creds
