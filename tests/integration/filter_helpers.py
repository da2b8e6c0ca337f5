"""Shared machinery for the filter tests: one bus, our service and xdg-dbus-proxy side by side.

A ``World`` owns, for a whole test module:

- a private dbus-daemon (``PrivateBus``),
- the real service (``python -m xdg_containers serve``) on it,
- a background thread running an asyncio loop, where every dbus-fast connection lives
  (the manager connection that called AddServer, the peers, raw clients), so that the
  tests themselves are plain synchronous functions and no connection is tied to a
  per-test event loop,
- any number of ``xdg-dbus-proxy --filter`` processes.

``World.pair(policy)`` gives the same policy twice: as AddServer named arguments on our
service and as xdg-dbus-proxy flags. ``runner(world, client)`` runs one action through an
address with a real client (tests/support/clients.py, and dbus-fast here), so the two
proxies can be compared.

Waiting is always for an event (a reply, a socket appearing, a barrier round trip), never a
blind sleep.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from tests.conftest import NAME as SERVICE_NAME
from tests.conftest import ServiceProcess, start_service
from tests.support.bus import started_bus
from tests.support.clients import (
    TIMEOUT,
    Call,
    Outcome,
    run_busctl,
    run_dbus_python,
    run_dbus_send,
    run_gdbus,
    runner_of,
)
from tests.support.names import EXT
from tests.support.processes import stop_all
from tests.support.wire import DRIVER, DRIVER_PATH

T = TypeVar("T")



# --------------------------------------------------------------------------------------
# policy, in both spellings


@dataclass
class Policy:
    """One filtering policy: levels, Call rules and Broadcast rules per (wildcard) name."""

    levels: dict[str, str] = field(default_factory=dict)
    calls: dict[str, list[str]] = field(default_factory=dict)
    broadcasts: dict[str, list[str]] = field(default_factory=dict)

    def named_arguments(self) -> dict[str, Variant]:
        """AddServer's named arguments for this policy (Filter true)."""
        named = {EXT + "Filter": Variant("b", True)}
        if self.levels:
            named[EXT + "Policy"] = Variant("a{ss}", dict(self.levels))
        if self.calls:
            named[EXT + "Call"] = Variant("a{sas}", {k: list(v) for k, v in self.calls.items()})
        if self.broadcasts:
            named[EXT + "Broadcast"] = Variant(
                "a{sas}", {k: list(v) for k, v in self.broadcasts.items()}
            )
        return named

    def xdp_flags(self) -> list[str]:
        """The same policy as xdg-dbus-proxy command-line flags."""
        flags = ["--filter"]
        for name, level in self.levels.items():
            flags.append(f"--{level}={name}")
        for name, rules in self.calls.items():
            flags += [f"--call={name}={rule}" for rule in rules]
        for name, rules in self.broadcasts.items():
            flags += [f"--broadcast={name}={rule}" for rule in rules]
        return flags


# --------------------------------------------------------------------------------------
# the background loop


class LoopThread:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for the result."""

    def __init__(self) -> None:
        """Start the loop."""
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the loop and join the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


# --------------------------------------------------------------------------------------
# dbus-fast connections: peers on the real bus and raw clients through a proxy


class Conn:
    """A dbus-fast connection living on the World's loop that records what it receives.

    As a peer it answers every method call by echoing the body (member ``Fail`` answers
    with the error ``org.test.Error.Failed``); with ``auto_reply=False`` calls are only
    recorded (a client that decides itself when and how to answer).
    """

    def __init__(self, world: World, bus: MessageBus, auto_reply: bool = True) -> None:
        """Wrap a connected MessageBus."""
        self.world = world
        self.bus = bus
        self.auto_reply = auto_reply
        self.received: list[Message] = []
        self._cond = threading.Condition()
        bus.add_message_handler(self._handler)

    @property
    def unique_name(self) -> str:
        """The connection's unique name on the real bus."""
        name = self.bus.unique_name
        assert name is not None
        return name

    def _handler(self, msg: Message) -> Any:
        with self._cond:
            self.received.append(msg)
            self._cond.notify_all()
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED or not self.auto_reply:
            return True
        if msg.member == "Fail":
            return Message.new_error(msg, "org.test.Error.Failed", "failed as asked")
        return Message.new_method_return(msg, msg.signature, msg.body)

    # -- queries on what arrived (any thread) --

    def calls(self, member: str | None = None) -> list[Message]:
        """Method calls received (optionally only ``member``)."""
        with self._cond:
            return [
                m
                for m in self.received
                if m.message_type == MessageType.METHOD_CALL
                and (member is None or m.member == member)
            ]

    def signals(self, member: str | None = None, sender: str | None = None) -> list[Message]:
        """Signals received, bus-driver signals excluded unless asked by ``sender``."""
        with self._cond:
            return [
                m
                for m in self.received
                if m.message_type == MessageType.SIGNAL
                and (member is None or m.member == member)
                and (sender is None or m.sender == sender)
                and (sender is not None or m.sender != DRIVER)
            ]

    def replies(self) -> list[Message]:
        """Method returns and errors received that no call of ours was waiting for."""
        with self._cond:
            return [
                m
                for m in self.received
                if m.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR)
            ]

    def wait_for(self, pred: Callable[[Message], bool], timeout: float = TIMEOUT) -> Message:
        """Wait until a received message satisfies ``pred``; return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.received:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("expected message did not arrive")
                self._cond.wait(left)

    # -- actions (from the test thread) --

    def call(
        self,
        destination: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        timeout: float = TIMEOUT,
        **fields: Any,
    ) -> Message:
        """A method call (``fields``: other Message fields; path "/" and interface
        org.test.Iface unless given); returns the reply (return or error)."""
        fields = {"path": "/", "interface": "org.test.Iface", **fields}
        msg = Message(destination=destination, member=member, signature=signature,
                      body=body or [], **fields)

        async def go() -> Message:
            return await asyncio.wait_for(self.bus.call(msg), timeout)

        return self.world.loop.run(go(), timeout + 5)

    def driver(self, member: str, signature: str = "", body: list[Any] | None = None) -> Message:
        """A call to the bus driver."""
        return self.call(DRIVER, member, signature, body, path=DRIVER_PATH, interface=DRIVER)

    def send(self, msg: Message) -> None:
        """Send any message as is (a raw, low-level send)."""

        async def go() -> None:
            await self.bus.send(msg)

        self.world.loop.run(go())

    def emit(
        self,
        member: str,
        *,
        path: str = "/",
        interface: str = "org.test.Iface",
        destination: str | None = None,
        body: list[Any] | None = None,
        signature: str = "",
    ) -> None:
        """Emit a signal (broadcast unless ``destination``)."""
        self.send(
            Message.new_signal(path, interface, member, signature, body or [])
            if destination is None
            else Message(message_type=MessageType.SIGNAL, path=path, interface=interface,
                         member=member, destination=destination, signature=signature,
                         body=body or [])
        )

    def roundtrip(self) -> None:
        """GetId to the bus and back: everything sent or queued for us before has been handled."""
        reply = self.driver("GetId")
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body

    def request_name(self, name: str, flags: int = 4) -> int:
        """RequestName (DO_NOT_QUEUE by default); returns the bus's answer code."""
        reply = self.driver("RequestName", "su", [name, flags])
        assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        return int(reply.body[0])

    def release_name(self, name: str) -> int:
        """ReleaseName; returns the bus's answer code."""
        reply = self.driver("ReleaseName", "s", [name])
        assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        return int(reply.body[0])

    def add_match(self, rule: str) -> Message:
        """AddMatch (the reply, not checked)."""
        return self.driver("AddMatch", "s", [rule])

    def close(self) -> None:
        """Disconnect."""

        async def go() -> None:
            self.bus.disconnect()
            try:
                await asyncio.wait_for(self.bus.wait_for_disconnect(), 5)  # type: ignore[no-untyped-call]
            except Exception:
                pass

        try:
            self.world.loop.run(go())
        except Exception:
            pass


def barrier(*conns: Conn) -> None:
    """Round trips in order: whatever the earlier ones sent has reached the later ones."""
    for c in conns:
        c.roundtrip()


# --------------------------------------------------------------------------------------
# the world


@dataclass
class Pair:
    """The same policy served by both proxies."""

    ours: str
    theirs: str
    server_path: str

    def items(self) -> list[tuple[str, str]]:
        """(label, address) for both."""
        return [("ours", self.ours), ("xdp", self.theirs)]


class World:
    """Bus + service + background loop + xdg-dbus-proxy processes, for one test module."""

    def __init__(self, activatable: Iterable[str] = ()) -> None:
        """Start the bus, the service and the loop; connect the manager.

        ``activatable``: names given a .service file whose Exec is /bin/false, so
        StartServiceByName reaches the bus and fails with Spawn.ChildExited.
        """
        self.runtime_dir = tempfile.mkdtemp(prefix="xdgc-filter-runtime-")
        os.chmod(self.runtime_dir, 0o700)
        self._service_dir = tempfile.mkdtemp(prefix="xdgc-filter-services-")
        for name in activatable:
            with open(os.path.join(self._service_dir, f"{name}.service"), "w") as fh:
                fh.write(f"[D-BUS Service]\nName={name}\nExec=/bin/false\n")
        self.bus = started_bus(service_dirs=[self._service_dir])
        self.loop = LoopThread()
        self._conns: list[Conn] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._xdp_dir = tempfile.mkdtemp(prefix="xdgc-xdp-")
        self._xdp_count = 0
        self.service: ServiceProcess = start_service(self.bus.address, self.runtime_dir)
        self.manager = self.peer()

    # -- connections --

    def connect(self, address: str, *, auto_reply: bool = True, fds: bool = True) -> Conn:
        """A recording dbus-fast connection to ``address``."""

        async def go() -> MessageBus:
            return await asyncio.wait_for(
                MessageBus(bus_address=address, negotiate_unix_fd=fds).connect(), TIMEOUT
            )

        conn = Conn(self, self.loop.run(go()), auto_reply)
        self._conns.append(conn)
        return conn

    def peer(self, *names: str) -> Conn:
        """A peer on the real bus owning ``names``."""
        conn = self.connect(self.bus.address)
        for n in names:
            assert conn.request_name(n) == 1, f"could not own {n}"
        return conn

    def echo_peer(self, name: str) -> subprocess.Popen[bytes]:
        """``dbus-test-tool echo`` owning ``name``; returns once the name is owned."""
        proc = subprocess.Popen(
            ["dbus-test-tool", "echo", f"--name={name}"],
            env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": self.bus.address},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._procs.append(proc)
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self.manager.driver("NameHasOwner", "s", [name])
            if reply.body and reply.body[0]:
                return proc
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dbus-test-tool echo did not take {name}")
            time.sleep(0.01)

    def owner(self, name: str) -> str:
        """The unique name owning ``name`` on the real bus."""
        reply = self.manager.driver("GetNameOwner", "s", [name])
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        return str(reply.body[0])

    # -- proxies --

    def add_server(self, named: dict[str, Variant] | None = None) -> tuple[str, str]:
        """AddServer on our service; returns (path, address)."""
        reply = self.manager.call(
            SERVICE_NAME,
            "AddServer",
            "sssa{sv}a{sv}",
            ["org.example.Test", "org.example.App", "filter", {}, named or {}],
            path="/org/freedesktop/DBus/Containers1",
            interface="org.freedesktop.DBus.Containers1",
        )
        assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        path, results = reply.body
        return str(path), str(results["Address"].value)

    def xdg_dbus_proxy(self, flags: list[str]) -> str:
        """Start ``xdg-dbus-proxy BUS SOCKET flags...``; returns its address once listening."""
        self._xdp_count += 1
        sock = os.path.join(self._xdp_dir, f"xdp{self._xdp_count}")
        proc = subprocess.Popen(
            ["xdg-dbus-proxy", self.bus.address, sock, *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._procs.append(proc)
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"xdg-dbus-proxy {flags} did not start")
            time.sleep(0.005)
        return f"unix:path={sock}"

    def pair(self, policy: Policy) -> Pair:
        """The policy on both proxies."""
        path, ours = self.add_server(policy.named_arguments())
        theirs = self.xdg_dbus_proxy(policy.xdp_flags())
        return Pair(ours, theirs, path)

    # -- teardown --

    def close(self) -> None:
        """Stop everything; check the service exits cleanly."""
        for c in self._conns:
            c.close()
        stop_all(self._procs)
        self.loop.stop()
        rc = None
        log = ""
        if self.service.process.poll() is None:
            rc = self.service.terminate()
        log = self.service.log()
        os.unlink(self.service.log_path)
        self.bus.stop()
        shutil.rmtree(self._xdp_dir, ignore_errors=True)
        shutil.rmtree(self._service_dir, ignore_errors=True)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        assert rc in (0, None), f"service exited {rc} on SIGTERM; log:\n{log}"


def world_fixture(activatable: Iterable[str] = ()) -> Iterator[World]:
    """Body of the module-scoped ``world`` fixtures."""
    w = World(activatable)
    try:
        yield w
    finally:
        w.close()


def make_dbus_fast_runner(world: World) -> Callable[..., Outcome]:
    """dbus-fast (pure Python) through the World's loop."""

    def backend(c: Call) -> Outcome:
        conn = world.connect(c.address)
        try:
            reply = conn.call(c.dest, c.member, c.signature, c.args, path=c.path,
                              interface=c.iface)
        finally:
            conn.close()
        if reply.message_type == MessageType.ERROR:
            return ("error", reply.error_name)
        value = reply.body[0] if reply.body else None
        return ("ok", sorted(value) if isinstance(value, list) else value)

    return runner_of(backend)


CLIENT_NAMES = ["dbus-send", "gdbus", "busctl", "dbus-python", "dbus-fast"]


def runner(world: World, client: str) -> Callable[..., Outcome]:
    """The action runner for ``client``."""
    return {
        "dbus-send": run_dbus_send,
        "gdbus": run_gdbus,
        "busctl": run_busctl,
        "dbus-python": run_dbus_python,
        "dbus-fast": make_dbus_fast_runner(world),
    }[client]


def normalise(outcome: Outcome, replace: dict[str, str] | None = None) -> Outcome:
    """Map unique names to stable labels: ``replace`` maps names, other unique names -> ':?'."""
    kind, value = outcome
    repl = replace or {}

    def one(v: Any) -> Any:
        if isinstance(v, str) and v.startswith(":"):
            return repl.get(v, ":?")
        return v

    if isinstance(value, list):
        return kind, sorted(one(v) for v in value)
    return kind, one(value)


def wait_until(pred: Callable[[], bool], timeout: float = TIMEOUT, what: str = "") -> None:
    """Poll ``pred`` (cheap checks only) until true."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        time.sleep(0.01)


def unique_names(names: Iterable[str]) -> list[str]:
    """The unique names among ``names``."""
    return [n for n in names if n.startswith(":")]
