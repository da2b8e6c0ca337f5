"""A stand-in for systemd's service manager, as far as the fd store goes.

The real one runs in tests too (``usermanager``, root and cgroups needed); this one
needs neither and records every message it gets. It speaks the same protocol to one
program:

- it binds ``$NOTIFY_SOCKET`` (``@abstract``, SO_PASSCRED) and takes datagrams from the
  main pid only (NotifyAccess=main); ``FDSTORE=1`` keeps the attached fds under
  ``FDNAME=`` (default ``stored``; a second copy of an already stored file is dropped;
  at most ``--max``, as FileDescriptorStoreMax=), ``FDSTOREREMOVE=1`` closes every fd of
  that name, ``FDPOLL=0`` stops the POLLHUP/POLLERR watch that otherwise drops an fd;
- it restarts the program when it dies of a signal or exits non-zero (Restart=on-failure,
  after ``--restart-sec``) with the kept fds at 3, 4, ... and ``LISTEN_PID`` (the new
  pid), ``LISTEN_FDS``, ``LISTEN_FDNAMES`` set as systemd sets them; a clean exit (0)
  ends the supervisor and the store with it.

Every step is a JSON line in ``--events`` (``t`` is CLOCK_MONOTONIC, comparable with the
test's ``time.monotonic()``). Run: ``python -m tests.support.fdsupervisor --events F
--notify @NAME [--max N] [--restart-sec S] -- PROGRAM ARGS``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}


class Supervisor:
    """The fd store of one service and its main process."""

    def __init__(self, argv: list[str], notify: str, events: str, limit: int,
                 restart_sec: float) -> None:
        self.argv = argv
        self.notify = notify
        self.events = open(events, "a", buffering=1)  # noqa: SIM115 - lives as long as we do
        self.limit = limit
        self.restart_sec = restart_sec
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(b"\0" + notify[1:].encode())
        self.store: list[tuple[str, int, bool]] = []  # (name, fd, poll) in upload order
        self.pid = 0
        self.pidfd = -1
        self.restart_at: float | None = 0.0
        self.done = False

    def event(self, kind: str, **fields: Any) -> None:
        """One JSON line."""
        self.events.write(json.dumps({"t": time.monotonic(), "event": kind, **fields}) + "\n")

    def start(self) -> None:
        """fork + exec with the store at 3.. and LISTEN_* as systemd sets them."""
        fds = [fd for _, fd, _ in self.store]
        names = ":".join(name for name, _, _ in self.store)
        pid = os.fork()
        if pid == 0:
            try:
                # Copies out of the way of 3.., close-on-exec: only 3.. are passed.
                moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]
                for i, fd in enumerate(moved):
                    os.dup2(fd, 3 + i)  # inheritable, as systemd passes them
                env = dict(os.environ, NOTIFY_SOCKET=self.notify)
                if fds:
                    env.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
                               LISTEN_FDNAMES=names)
                os.execve(self.argv[0], self.argv, env)
            finally:
                os._exit(127)
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.restart_at = None
        self.event("started", pid=pid, fds=len(fds), names=names)

    def reap(self) -> None:
        """The main process ended: restart it on failure, stop on a clean exit. What it
        sent before it ended is read first, as systemd does."""
        while True:
            try:
                self.receive(socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
        _, status = os.waitpid(self.pid, 0)
        os.close(self.pidfd)
        self.pidfd = -1
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        self.event("exited", pid=self.pid, signal=sig, code=code)
        if code == 0 or sig in CLEAN_SIGNALS:
            self.done = True
        else:
            self.restart_at = time.monotonic() + self.restart_sec

    def receive(self, flags: int = 0) -> None:
        """One notify datagram."""
        data, anc, _flags, _ = self.sock.recvmsg(
            4096, socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(12),
            socket.MSG_CMSG_CLOEXEC | flags,
        )
        fds: list[int] = []
        sender = 0
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                whole = len(payload) // 4
                fds += list(struct.unpack(f"{whole}i", payload[: whole * 4]))
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                sender = struct.unpack("3i", payload[:12])[0]
        if sender != self.pid:
            self.event("ignored", sender=sender, text=data.decode(errors="replace"))
            for fd in fds:
                os.close(fd)
            return
        fields = dict(line.partition("=")[::2] for line in data.decode().splitlines() if line)
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTOREREMOVE") == "1":
            for entry in [e for e in self.store if e[0] == name]:
                self.store.remove(entry)
                os.close(entry[1])
            self.event("removed", name=name)
        if fields.get("FDSTORE") == "1":
            for fd in fds:
                self.add(name, fd, fields.get("FDPOLL") != "0")
        elif fds:
            for fd in fds:
                os.close(fd)

    def add(self, name: str, fd: int, poll: bool) -> None:
        """Keep ``fd`` unless the same file is kept already or the store is full."""
        st = os.fstat(fd)
        for _, kept, _ in self.store:
            other = os.fstat(kept)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                os.close(fd)
                self.event("duplicate", name=name)
                return
        if len(self.store) >= self.limit:
            os.close(fd)
            self.event("full", name=name)
            return
        self.store.append((name, fd, poll))
        self.event("stored", name=name, ino=st.st_ino)

    def run(self) -> None:
        """Until the program exits cleanly or we get SIGTERM."""
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "done", True))
        while not self.done:
            now = time.monotonic()
            if self.restart_at is not None and now >= self.restart_at:
                self.start()
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            if self.pidfd >= 0:
                poller.register(self.pidfd, select.POLLIN)
            for _, fd, poll in self.store:
                if poll:
                    poller.register(fd, 0)
            timeout = 1000.0
            if self.restart_at is not None:
                timeout = max(0.0, (self.restart_at - now) * 1000)
            try:
                ready = poller.poll(timeout)
            except InterruptedError:
                continue
            for fd, revents in ready:
                if fd == self.sock.fileno():
                    self.receive()
                elif fd == self.pidfd:
                    self.reap()
                else:
                    self.hangup(fd, revents)
        if self.pidfd >= 0:
            os.kill(self.pid, signal.SIGTERM)
            os.waitpid(self.pid, 0)
        for _, fd, _ in self.store:
            os.close(fd)
        self.event("stopped")

    def hangup(self, fd: int, revents: int) -> None:
        """POLLHUP/POLLERR on a kept fd: drop it, as systemd does."""
        for entry in [e for e in self.store if e[1] == fd]:
            self.store.remove(entry)
            os.close(fd)
            self.event("hangup", name=entry[0], revents=revents)


def main() -> None:
    """Parse the command line and supervise."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", required=True)
    parser.add_argument("--notify", required=True, help="@abstract name")
    parser.add_argument("--max", type=int, default=16)
    parser.add_argument("--restart-sec", type=float, default=0.1)
    parser.add_argument("argv", nargs="+")
    args = parser.parse_args()
    Supervisor(args.argv, args.notify, args.events, args.max, args.restart_sec).run()


if __name__ == "__main__":
    main()
    sys.exit(0)
