"""Shared fixtures: a private dbus-daemon per test and the real service as a subprocess."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "org.freedesktop.DBus.Containers1"
PATH = "/org/freedesktop/DBus/Containers1"
IFACE = "org.freedesktop.DBus.Containers1"

pytest_plugins = ["tests.support.bus"]

if TYPE_CHECKING:
    from tests.support.bus import PrivateBus


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Any:
    """Tests marked ``glib`` run on asyncio-glib's loop (dbus-python peers need GLib);
    tests marked ``both_loops`` run on plain asyncio and on the service's dispatching loop."""
    if item.get_closest_marker("glib") is not None:
        import asyncio_glib

        return {"glib": asyncio_glib.GLibEventLoop}
    if item.get_closest_marker("both_loops") is not None:
        from xdg_containers.proxy.dispatch import new_event_loop

        return {"asyncio": asyncio.new_event_loop, "dispatch": new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "glib: run the test on a GLib-driven asyncio loop")
    config.addinivalue_line(
        "markers", "both_loops: run the test on asyncio's loop and on the dispatching loop"
    )


@dataclass
class ServiceProcess:
    """The service running as ``python -m xdg_containers serve``."""

    process: subprocess.Popen[bytes]
    bus_address: str
    runtime_dir: str
    log_path: str
    extra_args: list[str] = field(default_factory=list)

    def log(self) -> str:
        """Everything the service wrote to stderr so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        """Wait until ``text`` appears in the log; return the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.log()
            if text in out:
                return out
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not logged within {timeout}s; log:\n{self.log()}")

    def sockets(self) -> list[str]:
        """Sockets currently in the runtime socket dir."""
        d = os.path.join(self.runtime_dir, "dbus-1", "containers")
        if not os.path.isdir(d):
            return []
        return sorted(os.listdir(d))

    @property
    def pid(self) -> int:
        """The service's process id."""
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, SIGKILL if it hangs; the exit status."""
        try:
            return self.terminate(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def finish(self) -> None:
        """SIGTERM: it must exit 0; then its log file goes."""
        rc = self.terminate()
        assert rc == 0, f"service exited {rc} on SIGTERM; log:\n{self.log()}"
        os.unlink(self.log_path)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_service(
    bus_address: str,
    runtime_dir: str,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    *,
    prefix: list[str] | None = None,
    module: str = "xdg_containers",
) -> ServiceProcess:
    """Start the service on ``bus_address`` and wait for its READY=1; ``prefix`` runs it
    under a wrapper (``prlimit``), ``module`` through a test-only entry point."""
    log_fd, log_path = tempfile.mkstemp(prefix="xdgc-service-", suffix=".log")
    r, w = os.pipe()
    args = [
        *(prefix or []),
        sys.executable,
        "-m",
        module,
        "-v",
        "serve",
        "--address",
        bus_address,
        "--ready-fd",
        str(w),
        *(extra_args or []),
    ]
    full_env = dict(os.environ if env is None else env)
    full_env["XDG_RUNTIME_DIR"] = runtime_dir
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        args, stdout=log_fd, stderr=log_fd, pass_fds=(w,), env=full_env, cwd=REPO
    )
    os.close(w)
    os.close(log_fd)
    sp = ServiceProcess(proc, bus_address, runtime_dir, log_path, extra_args or [])
    ready, _, _ = select.select([r], [], [], 20)
    data = os.read(r, 100) if ready else b""
    os.close(r)
    if b"READY=1" not in data:
        proc.kill()
        proc.wait()
        raise AssertionError(f"service did not become ready; log:\n{sp.log()}")
    return sp


@pytest.fixture
def service_factory(bus: PrivateBus, runtime_dir: str) -> Iterator[Any]:
    """Start services with extra arguments; each is stopped (and checked) at teardown."""
    started: list[ServiceProcess] = []

    def factory(*extra: str) -> ServiceProcess:
        sp = start_service(bus.address, runtime_dir, list(extra))
        started.append(sp)
        return sp

    yield factory
    for sp in started:
        if sp.process.poll() is None:
            rc = sp.terminate()
            assert rc == 0, f"service exited {rc} on SIGTERM; log:\n{sp.log()}"
            assert sp.sockets() == [], f"sockets left behind: {sp.sockets()}"
        os.unlink(sp.log_path)


@pytest.fixture
def service(service_factory: Any) -> ServiceProcess:
    """The service with default limits."""
    sp: ServiceProcess = service_factory()
    return sp


async def connect(address: str, negotiate_unix_fd: bool = True) -> MessageBus:
    """A dbus-fast client connection."""
    return await MessageBus(bus_address=address, negotiate_unix_fd=negotiate_unix_fd).connect()


async def call(
    bus: MessageBus, member: str, signature: str = "", body: list[Any] | None = None, **fields: Any
) -> Message:
    """Call the manager (``fields``: other Message fields, e.g. destination, path, interface,
    unix_fds) and return the reply, method return or error, without raising."""
    fields = {"destination": NAME, "path": PATH, "interface": IFACE, **fields}
    fields["unix_fds"] = fields.get("unix_fds") or []
    msg = Message(member=member, signature=signature, body=body or [], **fields)
    reply = await asyncio.wait_for(bus.call(msg), 10)
    assert reply is not None
    return reply


def ok(reply: Message) -> list[Any]:
    """The body of a successful reply; fail with the error otherwise."""
    assert reply.message_type == MessageType.METHOD_RETURN, (
        f"expected success, got {reply.error_name}: {reply.body}"
    )
    return list(reply.body)


def error(reply: Message, name: str) -> str:
    """Assert the reply is the error ``name`` (short or full); return its text."""
    full = name if "." in name else f"org.freedesktop.DBus.Error.{name}"
    assert reply.message_type == MessageType.ERROR, f"expected {full}, got success {reply.body}"
    assert reply.error_name == full, f"expected {full}, got {reply.error_name}: {reply.body}"
    return str(reply.body[0]) if reply.body else ""


async def add_server_reply(
    bus: MessageBus,
    container_type: str = "org.example.Test",
    app_id: str = "org.example.App",
    instance_id: str = "instance-1",
    metadata: dict[str, Variant] | None = None,
    named: dict[str, Variant] | None = None,
    unix_fds: list[int] | None = None,
) -> Message:
    """AddServer's reply, success or error."""
    body = [container_type, app_id, instance_id, metadata or {}, named or {}]
    return await call(bus, "AddServer", "sssa{sv}a{sv}", body, unix_fds=unix_fds)


async def add_server(bus: MessageBus, *args: Any, **kwargs: Any) -> tuple[str, dict[str, Variant]]:
    """AddServer (``add_server_reply``'s arguments); returns (path, results)."""
    path, results = ok(await add_server_reply(bus, *args, **kwargs))
    return path, results


@asynccontextmanager
async def connected(*addresses: str) -> AsyncIterator[list[MessageBus]]:
    """A dbus-fast connection to each address, all disconnected on exit."""
    conns: list[MessageBus] = []
    try:
        for address in addresses:
            conns.append(await connect(address))
        yield conns
    finally:
        for c in conns:
            c.disconnect()


@asynccontextmanager
async def confined_client(
    manager: MessageBus, *args: Any, **kwargs: Any
) -> AsyncIterator[tuple[str, dict[str, Variant], MessageBus]]:
    """AddServer (``add_server``'s arguments) and a client on the minted socket:
    (path, results, client); the client is disconnected on exit."""
    path, results = await add_server(manager, *args, **kwargs)
    client = await connect(results["Address"].value)
    try:
        yield path, results, client
    finally:
        client.disconnect()


@pytest.fixture
async def manager_bus(bus: PrivateBus) -> AsyncIterator[MessageBus]:
    """A dbus-fast connection to the real bus (the launcher's point of view)."""
    b = await connect(bus.address)
    yield b
    b.disconnect()
