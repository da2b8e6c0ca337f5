"""The service's side of the fd keeper (``fdkeeper``): start it, talk to it.

The keeper is started on the first ``store()`` when none runs for the scope: detached
(a new session, stdin/stdout on /dev/null, stderr the service's, reparented once its
first fork returns), so it outlives a crash and the service never waits on it. Calls
block only for a round trip to a local process (5 s at most when it is stuck).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

from xdg_containers.sasl.client import SaslClient
from xdg_containers.service import fdkeeper, fdproto
from xdg_containers.service.fdcommon import FailureLog, check_name, log
from xdg_containers.wire.address import AddressError, parse_address
from xdg_containers.wire.build import BUS_INTERFACE, BUS_NAME, BUS_PATH, build_message, bus_call
from xdg_containers.wire.header import (
    FIELD_DESTINATION,
    FIELD_INTERFACE,
    FIELD_MEMBER,
    FIELD_PATH,
    FIELD_SIGNATURE,
    METHOD_CALL,
)
from xdg_containers.wire.types import BodyWriter

#: fdkeeper.py, run by path with ``python -I -S`` (it imports only the stdlib).
KEEPER = os.path.abspath(fdkeeper.__file__)
SERVICE_NAME = "org.freedesktop.DBus.Containers1"
#: Seconds one exchange with the keeper (or its start) may take.
TIMEOUT = 5.0
START_TIMEOUT = 10.0


def activation_bytes(uid: int) -> bytes:
    """What the keeper writes to the bus to start the service: SASL EXTERNAL as ``uid``,
    Hello (serial 1), StartServiceByName(SERVICE_NAME, 0) (serial 2)."""
    sasl = SaslClient(uid)
    body = BodyWriter()
    body.string(SERVICE_NAME)
    body.uint32(0)
    fields: dict[int, str | int] = {
        FIELD_PATH: BUS_PATH, FIELD_INTERFACE: BUS_INTERFACE,
        FIELD_MEMBER: "StartServiceByName", FIELD_DESTINATION: BUS_NAME,
        FIELD_SIGNATURE: "su",
    }
    return (sasl.start() + sasl.begin(negotiate_unix_fd=False) + bus_call(1, "Hello")
            + build_message(METHOD_CALL, 2, fields, body.bytes()))


def bus_sockaddr(address: str) -> bytes:
    """The first unix entry of a D-Bus address as bytes for connect() (abstract: NUL-led);
    AddressError when there is none."""
    for entry in parse_address(address):
        if entry.transport == "unix" and ("path" in entry.params or "abstract" in entry.params):
            target = entry.sockaddr()[1]
            return target if isinstance(target, bytes) else os.fsencode(str(target))
    raise AddressError(f"no unix:path= or unix:abstract= entry in {address[:200]!r}")


def private_directory(path: str) -> None:
    """Create ``path`` 0700 if missing; OSError unless it is a directory of ours, private."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise OSError(f"{path} is not a directory owned by uid {os.getuid()}")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


class KeeperFdStore:
    """The fd store kept by a keeper process listening on ``path``."""

    def __init__(self, path: str, bus: bytes | None, activation: bytes | None) -> None:
        """``bus``/``activation``: where and what the keeper sends to start the service
        (None: it cannot start it; clients then wait for the next start)."""
        self.path = path
        self.bus = bus
        self.activation = activation
        self.conn: socket.socket | None = None
        self.keeper_pid = 0
        self.failed = FailureLog("the fd keeper")

    def _connect(self) -> socket.socket | None:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        conn.settimeout(TIMEOUT)
        try:
            conn.connect(self.path)
            conn.send(b"HELLO=1")
            fields = fdproto.parse_fields(conn.recv(fdproto.MAX_PACKET))
            if fields.get("READY") != "1":
                raise ValueError("no READY")
            self.keeper_pid = int(fields.get("PID", "0"))
        except (OSError, ValueError):
            conn.close()
            return None
        return conn

    def _spawn(self) -> None:
        argv = [sys.executable, "-I", "-S", KEEPER, self.path,
                self.bus.hex() if self.bus else "-",
                self.activation.hex() if self.activation else "-"]
        try:
            rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                start_new_session=True, timeout=START_TIMEOUT,
                                check=False).returncode
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.failed("spawn", f"cannot start it: {exc}")
            return
        if rc != 0:
            self.failed("spawn", f"it did not start (exit status {rc}); see its log above")

    def _link(self, spawn: bool) -> socket.socket | None:
        """The connection to the keeper; with ``spawn``, start one if none answers."""
        if self.conn is None:
            self.conn = self._connect()
            if self.conn is None and spawn:
                self._spawn()
                self.conn = self._connect()
        return self.conn

    def _send(self, text: str, fds: list[int], spawn: bool) -> bool:
        for attempt in range(2):
            conn = self._link(spawn)
            if conn is None:
                if spawn:
                    self.failed("unreachable", f"no keeper answers on {self.path}")
                return False
            try:
                socket.send_fds(conn, [text.encode("ascii")], fds)
                return True
            except OSError as exc:
                # It may have exited just as we connected (holding nothing, no client).
                self.conn = None
                conn.close()
                if attempt:
                    self.failed(f"errno{exc.errno}", f"cannot send {text.splitlines()[0]}: "
                                f"{exc}")
        return False

    def store(self, name: str, fd: int) -> None:
        """Hand the keeper a copy of ``fd`` under ``name`` (starting it if needed)."""
        check_name(name)
        self._send(f"FDSTORE=1\nFDNAME={name}", [fd], spawn=True)

    def remove(self, name: str) -> None:
        """Make the keeper close its copy of ``name`` (no keeper: nothing is kept)."""
        check_name(name)
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}", [], spawn=False)

    def take_inherited(self) -> dict[str, int]:
        """Copies of everything the keeper holds (it keeps its own), by name."""
        conn = self._link(spawn=False)
        if conn is None or not self._send("FDGET=1", [], spawn=False):
            return {}
        out: dict[str, int] = {}
        try:
            more = True
            while more:
                data, fds, flags = fdproto.recv_packet(conn)
                fields = fdproto.parse_fields(data)
                names = fields["FDNAMES"].split(":") if fields.get("FDNAMES") else []
                more = fields.get("MORE") == "1"
                if len(names) != len(fds) or flags & socket.MSG_CTRUNC:
                    for fd in fds:
                        os.close(fd)
                    raise ValueError(f"{len(names)} names for {len(fds)} fds")
                out.update(zip(names, fds, strict=True))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("the fd keeper's hand-over broke off (%s): %d fds taken", exc, len(out))
        return out

    def close(self) -> None:
        """Tell the keeper we stop cleanly: it drops everything and exits (unless another
        service, the one replacing us, is connected)."""
        if self._link(spawn=False) is not None:
            self._send("STOPPING=1", [], spawn=False)
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def keeper_store(scope: str, bus_address: str | None) -> KeeperFdStore | None:
    """The keeper-backed store of ``scope`` under ``$XDG_RUNTIME_DIR/xdg-containers``;
    None (logged) without a usable runtime directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        log.warning("no fd store: not under systemd and XDG_RUNTIME_DIR is not set; "
                    "servers will not come back after a crash")
        return None
    directory = os.path.join(runtime, "xdg-containers")
    try:
        private_directory(directory)
    except OSError as exc:
        log.warning("no fd store: %s", exc)
        return None
    bus = activation = None
    if bus_address:
        try:
            bus = bus_sockaddr(bus_address)
            activation = activation_bytes(os.getuid())
        except AddressError as exc:
            log.warning("the fd keeper cannot start the service on demand: %s", exc)
    return KeeperFdStore(os.path.join(directory, f"fdstore-{scope}"), bus, activation)
