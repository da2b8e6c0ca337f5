"""systemd's fd store: notify datagrams out, ``LISTEN_FDS`` in (sd_notify(3),
sd_listen_fds(3)); the unit enables it with FileDescriptorStoreMax=."""

from __future__ import annotations

import array
import fcntl
import os
import socket
from collections.abc import Mapping, MutableMapping

from xdg_containers.service.fdcommon import FailureLog, check_name, log
from xdg_containers.service.fdproto import valid_name

#: What systemd hands a restarted service (LISTEN_PIDFDID since v256); all unset once read.
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID")
SD_LISTEN_FDS_START = 3


def inherited_from_env(
    env: Mapping[str, str], pid: int
) -> tuple[list[tuple[str, int]], list[str]]:
    """The (name, fd) pairs systemd passed, per sd_listen_fds_with_names, and the problems.

    Only for us when ``LISTEN_PID`` is our pid; fds start at 3; a missing name is
    ``unknown``, as sd_listen_fds_with_names says.
    """
    if "LISTEN_FDS" not in env:
        return [], []
    if env.get("LISTEN_PID", "") != str(pid):
        return [], [f"LISTEN_FDS is for pid {env.get('LISTEN_PID')!r}, not ours ({pid})"]
    try:
        count = int(env["LISTEN_FDS"])
    except ValueError:
        return [], [f"LISTEN_FDS={env['LISTEN_FDS'][:40]!r} is not a number"]
    if not 0 <= count <= 65536:
        return [], [f"LISTEN_FDS={count} is out of range"]
    names = env["LISTEN_FDNAMES"].split(":") if env.get("LISTEN_FDNAMES") else []
    names += ["unknown"] * (count - len(names))
    return [(names[i], SD_LISTEN_FDS_START + i) for i in range(count)], []


def take_listen_fds(env: MutableMapping[str, str], pid: int) -> dict[str, int]:
    """Claim the fds systemd passed: close-on-exec set, the variables unset (children must
    not take them for theirs); a bad or repeated name's fd is closed, with a log line."""
    pairs, problems = inherited_from_env(env, pid)
    for var in LISTEN_VARS:
        env.pop(var, None)
    for text in problems:
        log.warning("inherited fds ignored: %s", text)
    out: dict[str, int] = {}
    for name, fd in pairs:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:
            log.warning("inherited fd %d (%r) is not open", fd, name)
            continue
        if not valid_name(name) or name in out:
            log.warning("inherited fd %d named %r closed: %s", fd, name[:80],
                        "a repeated name" if name in out else "not a name of ours")
            os.close(fd)
            continue
        out[name] = fd
    return out


def notify_address(value: str) -> str | bytes:
    """The socket address of ``$NOTIFY_SOCKET``: a path, or ``@name`` for an abstract one."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if not value.startswith("/"):
        raise ValueError(f"NOTIFY_SOCKET={value[:80]!r} is neither an absolute path nor @abstract")
    return value


class SystemdFdStore:
    """systemd's fd store (FileDescriptorStoreMax= of the unit), through notify datagrams."""

    def __init__(self, address: str | bytes) -> None:
        """``address``: the notify socket (see notify_address)."""
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.names: set[str] = set()
        self.failed = FailureLog("systemd's fd store")

    def _send(self, text: str, fds: list[int]) -> bool:
        # Not socket.send_fds: it ignores its address argument.
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            self.sock.sendmsg([text.encode("ascii")], anc if fds else [], 0, self.address)
            return True
        except OSError as exc:
            self.failed(f"errno{exc.errno}", f"cannot send {text.splitlines()[0]}: {exc}")
            return False

    def store(self, name: str, fd: int) -> None:
        """FDSTOREREMOVE then FDSTORE: names need not be unique in systemd's store, ours
        are (systemd's own notify_push_fd does the same)."""
        check_name(name)
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}", [])
        if self._send(f"FDSTORE=1\nFDNAME={name}", [fd]):
            self.names.add(name)

    def remove(self, name: str) -> None:
        """FDSTOREREMOVE: systemd closes every fd of that name."""
        check_name(name)
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}", [])
        self.names.discard(name)

    def take_inherited(self) -> dict[str, int]:
        """What systemd passed on this start (LISTEN_FDS from the fd store)."""
        fds = take_listen_fds(os.environ, os.getpid())
        self.names.update(fds)
        return fds

    def close(self) -> None:
        """Remove every name this run stored or inherited. A stop without restart would
        flush the store anyway; a restart job (``systemctl restart``) would not."""
        for name in sorted(self.names):
            self._send(f"FDSTOREREMOVE=1\nFDNAME={name}", [])
        self.names.clear()
        self.sock.close()


def sd_notify(text: str) -> bool:
    """Send one notify datagram to ``$NOTIFY_SOCKET`` (no fds); False when not under
    systemd or when it cannot be sent."""
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    try:
        address = notify_address(value)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(text.encode("ascii"), address)
    except (OSError, ValueError) as exc:
        log.warning("cannot tell systemd %s: %s", text, exc)
        return False
    return True
