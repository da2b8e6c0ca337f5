"""Shared helpers for the Containers1 integration tests (``test_containers1_*.py``).

Everything here talks to the service from outside, as a launcher, a portal or
a confined app would: dbus-fast connections, raw sockets, and child processes
(CLI clients, or a process running as another uid).
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from tests.conftest import IFACE, NAME, PATH, call, connect, ok
from tests.support.processes import close_all
from tests.support.sasl import opening

DRIVER = "org.freedesktop.DBus"
DRIVER_PATH = "/org/freedesktop/DBus"
SERVER_PREFIX = "/org/freedesktop/DBus/Containers1/c"
#: The uid a "local attacker" / "other user" runs as (nobody on Debian).
NOBODY = 65534

#: The named arguments SPEC §3 lists: exactly what SupportedArguments must hold.
SPEC_ARGUMENTS = sorted(
    [
        "StopOnDisconnect",
        "StopOnNotify",
        "org.freedesktop.XdgContainers1.ListenFD",
        "org.freedesktop.XdgContainers1.Filter",
        "org.freedesktop.XdgContainers1.Policy",
        "org.freedesktop.XdgContainers1.Call",
        "org.freedesktop.XdgContainers1.Broadcast",
        "org.freedesktop.XdgContainers1.Log",
        "org.freedesktop.XdgContainers1.Bus",
        "org.freedesktop.XdgContainers1.Connector",
    ]
)

#: upstream's test/data/valid-config-files/limit-containers.conf, in our limit names.
LIMIT_CONTAINERS = (
    "--limit",
    "max_servers_per_uid=3",
    "--limit",
    "max_metadata_bytes=4096",
    "--limit",
    "max_connections_per_server=3",
)
#: upstream's max-containers.conf.
MAX_CONTAINERS = ("--limit", "max_servers=3")


# -- bus calls ---------------------------------------------------------------------------


async def driver_call(
    bus: MessageBus, member: str, signature: str = "", body: list[Any] | None = None
) -> Message:
    """Call the bus driver; the reply (success or error)."""
    return await call(
        bus, member, signature, body, destination=DRIVER, path=DRIVER_PATH, interface=DRIVER
    )


async def add_match(bus: MessageBus, rule: str) -> None:
    """AddMatch on the bus driver; fail on error."""
    ok(await driver_call(bus, "AddMatch", "s", [rule]))


async def name_has_owner(bus: MessageBus, name: str) -> bool:
    """NameHasOwner on the bus driver."""
    return bool(ok(await driver_call(bus, "NameHasOwner", "s", [name]))[0])


async def manager(
    bus: MessageBus, member: str, signature: str = "", body: list[Any] | None = None
) -> Message:
    """Call a manager method (alias of ``call`` for readability)."""
    return await call(bus, member, signature, body)


def close_fds(reply: Message) -> None:
    """Close the fds a reply carried (ProcessFD, ...)."""
    close_all(reply.unix_fds)


async def list_servers(bus: MessageBus) -> list[str]:
    """ListServers()."""
    return list(ok(await call(bus, "ListServers"))[0])


# -- observing signals and replies, in arrival order ----------------------------------------


@dataclass
class Event:
    """One message seen by an Observer."""

    kind: str  # "removed", "owner", "signal", "reply"
    args: tuple[Any, ...]
    sender: str | None


class Observer:
    """Records, in arrival order on one connection: ServerRemoved, NameOwnerChanged,
    other signals matched later, and every reply (by reply serial).

    A message handler sees messages before dbus-fast resolves a call's future,
    so after ``await call(...)`` everything that arrived before that reply is
    already recorded.
    """

    def __init__(self, bus: MessageBus) -> None:
        """Wrap a connected bus; call ``start()``."""
        self.bus = bus
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    async def start(self) -> Observer:
        """Install the handler and the match rules."""
        self.bus.add_message_handler(self._on_message)
        await add_match(
            self.bus,
            f"type='signal',sender='{NAME}',path='{PATH}',interface='{IFACE}',member='ServerRemoved'",
        )
        await add_match(
            self.bus,
            f"type='signal',sender='{DRIVER}',interface='{DRIVER}',member='NameOwnerChanged'",
        )
        return self

    def _on_message(self, msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL:
            if msg.member == "ServerRemoved" and msg.interface == IFACE:
                self.events.append(
                    Event("removed", (msg.body[0], msg.path, msg.signature), msg.sender)
                )
            elif msg.member == "NameOwnerChanged" and msg.sender == DRIVER:
                self.events.append(Event("owner", tuple(msg.body), msg.sender))
            else:
                self.events.append(
                    Event(
                        "signal", (msg.interface, msg.member, msg.path, tuple(msg.body)), msg.sender
                    )
                )
        elif msg.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR):
            self.events.append(Event("reply", (msg.reply_serial,), msg.sender))
        self._changed.set()
        return None

    def removed(self) -> list[str]:
        """Paths of every ServerRemoved seen, in order (duplicates kept)."""
        return [e.args[0] for e in self.events if e.kind == "removed"]

    def signals(self, interface: str, member: str) -> list[Event]:
        """Other signals seen."""
        return [e for e in self.events if e.kind == "signal" and e.args[:2] == (interface, member)]

    def new_unique_names(self) -> list[str]:
        """Unique names that appeared on the bus while observing."""
        return [
            e.args[0]
            for e in self.events
            if e.kind == "owner" and e.args[0].startswith(":") and e.args[2]
        ]

    async def wait_for(
        self, predicate: Callable[[], bool], what: str, timeout: float = 3.0
    ) -> None:
        """Wait (without sleeping) until ``predicate()`` holds after some message arrived."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; events: {self.events}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_removed(self, path: str, timeout: float = 3.0) -> None:
        """Wait for ServerRemoved(path)."""
        await self.wait_for(lambda: path in self.removed(), f"ServerRemoved({path})", timeout)

    async def wait_name_gone(self, name: str, timeout: float = 3.0) -> None:
        """Wait until ``name`` has no owner (NameOwnerChanged with an empty new owner)."""

        def gone() -> bool:
            return any(
                e.kind == "owner" and e.args[0] == name and not e.args[2] for e in self.events
            )

        if not gone() and not await name_has_owner(self.bus, name):
            return
        await self.wait_for(gone, f"{name} to leave the bus", timeout)

    async def sync(self) -> None:
        """A round trip to the service: whatever it sent us before is now recorded."""
        ok(await call(self.bus, "ListServers"))


@asynccontextmanager
async def observing(address: str) -> AsyncIterator[Observer]:
    """A connection to ``address`` that records ServerRemoved and NameOwnerChanged.

    Test modules wrap this in an ``observer`` fixture.
    """
    conn = await connect(address)
    try:
        yield await Observer(conn).start()
    finally:
        conn.disconnect()


async def wait_disconnected(conn: MessageBus, timeout: float = 3.0) -> None:
    """Wait until the other side closed ``conn`` (EOF and resets count as closed)."""
    try:
        await asyncio.wait_for(conn.wait_for_disconnect(), timeout)
    except (EOFError, OSError):
        pass
    assert not conn.connected


# -- results and sockets ------------------------------------------------------------------


def socket_path_of(results: dict[str, Any]) -> str:
    """The SocketPath result as a str (without its trailing NUL)."""
    raw: bytes = results["SocketPath"].value
    assert raw.endswith(b"\0"), raw
    return os.fsdecode(raw[:-1])


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    """Poll a local condition (file gone, process exited) with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def connect_errno(path: str) -> int | None:
    """Try a plain connect(); None if it succeeded (the socket is closed again), else errno."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as exc:
        return exc.errno
    finally:
        s.close()
    return None


def sasl_probe(path: str, uid: int | None = None, timeout: float = 3.0) -> bytes:
    """Connect, send ``AUTH EXTERNAL <uid>``, return what came back until CRLF or close.

    ``b""`` means the server closed the connection without a word.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        try:
            s.sendall(opening(uid, begin=False))
        except (BrokenPipeError, ConnectionResetError):
            return b""
        data = b""
        while b"\r\n" not in data:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
        return data
    finally:
        s.close()


@contextmanager
def reachable_by_others(socket_path: str, top: str) -> Iterator[None]:
    """Let another uid reach ``socket_path``: dirs from ``top`` down get o+x, the socket o+rw.

    Restores the modes afterwards. The dirs stay unreadable (no listing).
    """
    saved: list[tuple[str, int]] = []
    d = os.path.dirname(socket_path)
    dirs = []
    top = os.path.abspath(top)
    while True:
        dirs.append(d)
        if os.path.abspath(d) == top or d == "/":
            break
        d = os.path.dirname(d)
    try:
        for p in dirs:
            mode = stat.S_IMODE(os.stat(p).st_mode)
            saved.append((p, mode))
            os.chmod(p, mode | 0o011)
        mode = stat.S_IMODE(os.stat(socket_path).st_mode)
        saved.append((socket_path, mode))
        os.chmod(socket_path, 0o777)
        yield
    finally:
        for p, mode in reversed(saved):
            try:
                os.chmod(p, mode)
            except FileNotFoundError:
                pass


#: A child that connects to argv[1] as whatever uid it runs as, sends the bytes hex-encoded
#: in argv[2] (else claims its own uid), and reports what the server said before closing.
_PROBE_CHILD = r"""
import binascii, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(3)
s.connect(sys.argv[1])
own = b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n"
data = b""
try:
    s.sendall(binascii.unhexlify(sys.argv[2]) if len(sys.argv) > 2 else own)
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
except (BrokenPipeError, ConnectionResetError):
    pass
except socket.timeout:
    print("TIMEOUT", repr(data))
    sys.exit(2)
print("CLOSED", os.getuid(), repr(data))
"""


def as_nobody_kwargs() -> dict[str, Any]:
    """Popen arguments that run a child as uid/gid 65534 with no supplementary groups."""
    return {
        "user": NOBODY,
        "group": NOBODY,
        "extra_groups": [],
        "cwd": "/",
        "env": {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/nonexistent",
            "LANG": "C.UTF-8",
        },
    }


def stdlib_python() -> str:
    """An interpreter another uid can execute (the venv's may point into /root)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK) and os.stat(candidate).st_mode & stat.S_IXOTH:
            return candidate
    return sys.executable


def probe_as_nobody(socket_path: str, send: bytes = b"") -> subprocess.CompletedProcess[str]:
    """Run the SASL probe child (stdlib only) as nobody; it sends ``send``, else an AUTH
    claiming its own uid."""
    return subprocess.run(
        [stdlib_python(), "-I", "-c", _PROBE_CHILD, socket_path, *([send.hex()] if send else [])],
        capture_output=True,
        text=True,
        timeout=10,
        **as_nobody_kwargs(),
    )


async def dbus_send(
    address: str, member: str, *args: str, dest: str = NAME, path: str = PATH, iface: str = IFACE
) -> str:
    """``dbus-send --print-reply`` (to the manager unless told); its output, failing the test
    on an error."""
    rc, out, err = await run_cmd(
        "dbus-send", f"--bus={address}", "--print-reply", f"--dest={dest}", path,
        f"{iface}.{member}", *args,
    )
    assert rc == 0, err
    return out


async def gdbus_call(
    address: str, path: str, method: str, *args: str, dest: str = NAME, nobody: bool = False
) -> tuple[int, str, str]:
    """``gdbus call`` of ``method`` (interface.member) on ``path`` (gdbus can spell a{sv});
    (exit status, stdout, stderr)."""
    argv = ["gdbus", "call", "--address", address, "-d", dest, "-o", path, "-m", method]
    return await run_cmd(*argv, *args, nobody=nobody)


async def run_cmd(*args: str, nobody: bool = False, timeout: float = 5.0) -> tuple[int, str, str]:
    """Run a command without blocking the loop (in-process peers keep serving)."""
    kwargs: dict[str, Any] = as_nobody_kwargs() if nobody else {}
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, **kwargs
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{args} did not finish within {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def recv_until(
    sock: socket.socket, buf: bytes, done: Callable[[bytes], bool], timeout: float = 3.0
) -> bytes:
    """Read from a blocking socket until ``done(buf)``; fail on EOF or timeout."""
    sock.settimeout(timeout)
    while not done(buf):
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed; got so far: {buf!r}")
        buf += chunk
    return buf
