"""Kernel-reported credentials of a unix socket peer, taken once at accept time.

Python 3.11 lacks the newer constants, so the Linux values are spelled here.
A pidfd (SO_PEERPIDFD, Linux 6.5+) names the process race-free; where the
kernel lacks it we record none rather than opening one by pid (that would race).
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
    os.set_inheritable(fd, False)
    return int(fd)


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


def read_peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED plus groups, pidfd and security label of a connected unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(
        pid=pid,
        uid=uid,
        gid=gid,
        groups=_peer_groups(sock),
        pidfd=_peer_pidfd(sock),
        security_label=_peer_security_label(sock),
    )
