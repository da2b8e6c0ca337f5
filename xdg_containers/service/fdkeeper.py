"""The fd keeper: a tiny process that holds the service's listening sockets (SPEC 13).

Without systemd, nothing outside the service would keep its sockets open across a
crash; the keeper does, speaking systemd's fd-store messages over
``$XDG_RUNTIME_DIR/xdg-containers/fdstore-<scope>`` (``SOCK_SEQPACKET``, 0600 in a
0700 directory, peers of our own uid only). One packet each way per message:

- ``HELLO=1`` -> ``READY=1\\nPID=<keeper pid>`` (a client is "connected" from then on);
- ``FDSTORE=1\\nFDNAME=<name>`` with one fd attached (replaces an earlier fd of that name;
  ``FDPOLL=0`` stops the POLLHUP/POLLERR watch that otherwise drops it, as systemd does);
- ``FDSTOREREMOVE=1\\nFDNAME=<name>``;
- ``FDGET=1`` -> packets ``FDNAMES=a:b\\nMORE=1`` with those fds attached (at most 253 per
  packet, what SCM_RIGHTS carries), the last one ``MORE=0``;
- ``STOPPING=1``: a clean stop. From the only client: everything is dropped and the
  keeper exits; while another client is connected (a ``--replace`` hand-over), only that
  connection ends.

The keeper hands copies over and keeps its own until removed, so a second crash also
restores them. While no client is connected and it holds listening sockets, it polls
them: a client connecting (not accepted here) makes it ask the bus to start the service
(``fdactivation``), as socket activation would. It exits when it holds nothing and
nobody is connected, or when its socket path is gone (logout).

Stdlib only, no asyncio: it runs as ``python3 -I -S fdkeeper.py SOCKET BUS ACTIVATION``
(BUS and ACTIVATION in hex, ``-`` for none) and forks once, the parent exiting when the
socket listens, so the service's spawn returns when it can connect and never waits on
the keeper afterwards.
"""

from __future__ import annotations

import fcntl
import os
import resource
import select
import socket
import struct
import sys
import time

if __package__:
    from xdg_containers.service import fdactivation, fdproto
else:  # run by path: the siblings it needs are stdlib-only too
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fdactivation  # type: ignore[import-not-found,no-redef,unused-ignore]
    import fdproto  # type: ignore[import-not-found,no-redef,unused-ignore]

log = fdproto.log
#: Seconds a fresh keeper waits for its first client before giving up.
START_GRACE = 30.0
#: Seconds between checks that our socket path still exists.
PATH_CHECK = 30.0
_POLL_BAD = select.POLLHUP | select.POLLERR
#: Packets of one client read per poll round at most (others get their turn).
BURST = 256


class Keeper:
    """The keeper's state: held fds by name, clients, the activation in flight."""

    def __init__(self, listener: socket.socket, path: str,
                 activation: fdactivation.Activation) -> None:
        self.listener = listener
        self.path = path
        self.ino = os.stat(path).st_ino
        self.activation = activation
        self.held: dict[str, int] = {}
        self.unpolled: set[str] = set()
        self.clients: dict[int, socket.socket] = {}
        self.ready: set[int] = set()
        self.logged: set[str] = set()
        self.started = time.monotonic()
        self.had_client = False
        self.path_checked = time.monotonic()
        self.stop = False

    def once(self, kind: str, text: str) -> None:
        """Log ``text`` the first time a failure of ``kind`` happens."""
        if kind not in self.logged:
            self.logged.add(kind)
            log(text)

    def drop(self, name: str) -> None:
        """Close the fd held under ``name``, if any."""
        fd = self.held.pop(name, None)
        self.unpolled.discard(name)
        if fd is not None:
            os.close(fd)

    def listening(self) -> list[tuple[str, int]]:
        """Held listening sockets (activation watches them)."""
        out = []
        for name, fd in self.held.items():
            try:
                s = socket.socket(fileno=fd)
            except OSError:  # not a socket
                continue
            try:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    out.append((name, fd))
            finally:
                s.detach()
        return out

    def accept(self) -> None:
        """A new client: ours only if its uid is ours (SO_PEERCRED)."""
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            self.once(f"uid{uid}", f"refused a client of uid {uid} (pid {pid}): not ours")
            conn.close()
            return
        conn.setblocking(False)
        self.clients[conn.fileno()] = conn

    def receive(self, conn: socket.socket) -> None:
        """Handle what ``conn`` sent (EOF: it is gone). A burst is read in one round: a
        round costs a poll over every held fd."""
        for _ in range(BURST):
            try:
                data, fds, flags = fdproto.recv_packet(conn)
            except BlockingIOError:
                return
            except OSError:
                data, fds, flags = b"", [], 0
            if not data and not fds:
                self.disconnect(conn)
                return
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise ValueError("packet or its fds truncated")
                self.handle(conn, fdproto.parse_fields(data), fds)
            except (ValueError, UnicodeDecodeError) as exc:
                self.once("garbage", f"ignored a bad packet (and any more like it): {exc}")
            except OSError as exc:
                self.once(f"send{exc.errno}", f"cannot answer a client: {exc}")
            finally:
                for fd in fds:
                    os.close(fd)
            if conn.fileno() < 0:  # STOPPING closed it
                return

    @staticmethod
    def answer(conn: socket.socket, text: str, fds: list[int]) -> None:
        """Send one packet, waiting at most 5 s for room (clients are non-blocking)."""
        conn.settimeout(5.0)
        try:
            socket.send_fds(conn, [text.encode()], fds)
        finally:
            conn.setblocking(False)

    def handle(self, conn: socket.socket, fields: dict[str, str], fds: list[int]) -> None:
        """Act on one parsed packet; fds it keeps are taken out of ``fds``."""
        name = fields.get("FDNAME", "")
        if ("FDSTORE" in fields or "FDSTOREREMOVE" in fields) and not fdproto.valid_name(name):
            raise ValueError(f"bad FDNAME {name[:60]!r}")
        if fields.get("FDSTORE") == "1":
            if len(fds) != 1:
                raise ValueError(f"FDSTORE with {len(fds)} fds, not 1")
            self.drop(name)
            self.held[name] = fds.pop()
            if fields.get("FDPOLL") == "0":
                self.unpolled.add(name)
        elif fields.get("FDSTOREREMOVE") == "1":
            self.drop(name)
        elif fields.get("HELLO") == "1":
            self.answer(conn, f"READY=1\nPID={os.getpid()}", [])
            self.ready.add(conn.fileno())
            self.had_client = True
        elif fields.get("FDGET") == "1":
            self.hand_over(conn)
        elif fields.get("STOPPING") == "1":
            if not self.others_connected(conn):
                for held in list(self.held):
                    self.drop(held)
                self.stop = True
            self.disconnect(conn)
        else:
            raise ValueError(f"unknown request {sorted(fields)[:4]}")
        if fds:
            raise ValueError(f"{len(fds)} unexpected fds")

    def others_connected(self, conn: socket.socket) -> bool:
        """Whether a service other than ``conn`` is connected (one that hung up but whose
        EOF is not read yet does not count)."""
        poller = select.poll()
        for fd in self.ready - {conn.fileno()}:
            poller.register(fd, 0)
        gone = {fd for fd, _ in poller.poll(0)}
        return bool(self.ready - {conn.fileno()} - gone)

    def hand_over(self, conn: socket.socket) -> None:
        """Send copies of every held fd (we keep ours: a second crash restores them too)."""
        items = list(self.held.items())
        for start in range(0, max(len(items), 1), fdproto.MAX_FDS):
            chunk = items[start : start + fdproto.MAX_FDS]
            more = int(start + fdproto.MAX_FDS < len(items))
            text = f"FDNAMES={':'.join(n for n, _ in chunk)}\nMORE={more}"
            self.answer(conn, text, [fd for _, fd in chunk])

    def disconnect(self, conn: socket.socket) -> None:
        """Forget a client; with none left, activation watches the listening sockets."""
        self.clients.pop(conn.fileno(), None)
        self.ready.discard(conn.fileno())
        conn.close()

    def poll_set(self, now: float) -> dict[int, tuple[int, str]]:
        """fd -> (events, role) for this round."""
        watched: dict[int, tuple[int, str]] = {self.listener.fileno(): (select.POLLIN, "")}
        for fd in self.clients:
            watched[fd] = (select.POLLIN, "")
        activating = not self.ready and self.activation.may_start(now)
        listen = dict(self.listening()) if activating else {}
        for name, fd in self.held.items():
            if name in self.unpolled and name not in listen:
                continue
            watched[fd] = (select.POLLIN if name in listen else 0, name)
        if self.activation.conn is not None:
            watched[self.activation.conn.fileno()] = (select.POLLIN, "")
        return watched

    def step(self) -> None:
        """One poll round."""
        now = time.monotonic()
        watched = self.poll_set(now)
        poller = select.poll()
        for fd, (events, _) in watched.items():
            poller.register(fd, events)
        timeout = min(PATH_CHECK, self.activation.timeout(now))
        for fd, revents in poller.poll(max(timeout, 0.01) * 1000):
            events, name = watched[fd]
            if fd == self.listener.fileno():
                self.accept()
            elif fd in self.clients:
                self.receive(self.clients[fd])
            elif self.activation.conn is not None and fd == self.activation.conn.fileno():
                self.activation.readable()
            elif name in self.held and revents & _POLL_BAD:
                log(f"dropped {name}: its peer hung up")
                self.drop(name)
            elif (name in self.held and revents & select.POLLIN and not self.ready
                  and self.activation.may_start(time.monotonic())):
                self.activation.start(name)
        if now - self.path_checked > PATH_CHECK:
            self.path_checked = now
            try:
                gone = os.stat(self.path).st_ino != self.ino
            except OSError:
                gone = True
            if gone:
                log(f"{self.path} is gone (logout?): dropping everything")
                self.stop = True

    def finished(self) -> bool:
        """True when the keeper has nothing left to do."""
        if self.stop:
            return True
        waited = self.had_client or time.monotonic() - self.started > START_GRACE
        return not self.held and not self.clients and waited

    def run(self) -> int:
        """Serve until finished; the socket path is ours to remove."""
        while not self.finished():
            self.step()
        for name in list(self.held):
            self.drop(name)
        try:
            if os.stat(self.path).st_ino == self.ino:
                os.unlink(self.path)
        except OSError:
            pass
        return 0


def bind(path: str) -> tuple[socket.socket, int] | None:
    """Our listening socket and its lock (``path.lock``); None if another keeper runs."""
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    deadline = time.monotonic() + 5.0
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            # Another keeper holds it: either serving (we are not needed) or exiting.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                probe.connect(path)
                os.close(lock)
                return None
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
            finally:
                probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(64)
    return listener, lock


def main(argv: list[str]) -> int:
    """``fdkeeper.py SOCKET BUS ACTIVATION``: fork, bind, tell the parent, serve."""
    path, bus_hex, activation_hex = argv[1:4]
    activation = fdactivation.Activation(
        None if bus_hex == "-" else bytes.fromhex(bus_hex),
        None if activation_hex == "-" else bytes.fromhex(activation_hex),
        fdproto.reply_outcome, log)
    ready_r, ready_w = os.pipe()
    if os.fork():
        os.close(ready_w)
        status = os.read(ready_r, 1)
        return 0 if status == b"1" else 1
    os.close(ready_r)
    os.setsid()
    # It holds every server's fds (three each): the soft limit (often 1024) is too low.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        bound = bind(path)
    except OSError as exc:
        log(f"cannot listen on {path}: {exc}")
        return 1
    os.write(ready_w, b"1")
    os.close(ready_w)
    if bound is None:
        return 0
    listener, _lock = bound
    return Keeper(listener, path, activation).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
