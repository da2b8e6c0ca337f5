"""The service process: losing the bus, a second instance, signals, and what it leaves in
$XDG_RUNTIME_DIR (SPEC §1, §5, §8)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from tests.conftest import (
    NAME,
    REPO,
    ServiceProcess,
    add_server,
    call,
    confined_client,
    connect,
    ok,
)
from tests.integration.helpers_c1 import list_servers, socket_path_of, wait_disconnected, wait_until
from tests.support.bus import PrivateBus
from tests.support.commands import sasl_probe

pytestmark = pytest.mark.timeout(30)


def sockets_under(directory: str) -> list[str]:
    """Every unix socket file anywhere below ``directory``."""
    found = []
    for root, _dirs, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            try:
                if stat.S_ISSOCK(os.lstat(p).st_mode):
                    found.append(p)
            except FileNotFoundError:
                pass
    return found


@asynccontextmanager
async def populated(manager_bus: MessageBus) -> AsyncIterator[tuple[list[str], list[MessageBus]]]:
    """Three servers: one idle, one with a client, one stopped listening with a client.

    Yields (socket paths that exist, confined clients); the clients are disconnected on exit.
    """
    _idle, r1 = await add_server(manager_bus, instance_id="idle")
    _busy, r2 = await add_server(manager_bus, instance_id="busy")
    quiet, r3 = await add_server(manager_bus, instance_id="quiet")
    clients = [await connect(r2["Address"].value), await connect(r3["Address"].value)]
    ok(await call(manager_bus, "StopListening", "o", [quiet]))
    paths = [socket_path_of(r1), socket_path_of(r2)]
    try:
        assert all(os.path.exists(p) for p in paths)
        yield paths, clients
    finally:
        for c in clients:
            c.disconnect()


async def test_bus_death_exits_non_zero_with_clear_log(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus, runtime_dir: str
) -> None:
    async with populated(manager_bus) as (paths, clients):
        bus.stop()
        rc = await asyncio.to_thread(service.process.wait, 5)
        assert rc != 0, "losing the bus is not a clean exit"
        log = service.log()
        assert re.search(
            r"(?im)^.*\b(ERROR|CRITICAL)\b.*\bbus\b.*\b(lost|closed|disconnected|gone|went away)\b",
            log,
        ), log
        assert not any(os.path.exists(p) for p in paths)
        assert sockets_under(runtime_dir) == []
        for c in clients:
            await wait_disconnected(c)


async def test_second_instance_exits_non_zero_name_taken(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus, runtime_dir: str
) -> None:
    async with confined_client(manager_bus, metadata={"k": Variant("s", "v")}) as (
        path,
        results,
        confined,
    ):
        env = dict(os.environ, XDG_RUNTIME_DIR=runtime_dir)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "xdg_containers", "serve", "--address", bus.address],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            cwd=REPO,
        )
        assert proc.returncode != 0, proc.stderr
        text = proc.stdout + proc.stderr
        assert NAME in text, text
        assert re.search(r"(?i)already (owned|taken|in use|running)|is taken|name.*taken", text), (
            text
        )
        # The first instance is undisturbed: same owner, its socket and connection intact.
        assert service.process.poll() is None
        assert os.path.exists(socket_path_of(results))
        assert (await asyncio.to_thread(sasl_probe, socket_path_of(results))).startswith(b"OK ")
        assert await list_servers(manager_bus) == [path]
        info = ok(await call(manager_bus, "GetConnectionInfo", "s", [confined.unique_name]))
        assert info[0] == path
        assert confined.connected


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_unlinks_sockets_and_exits_zero(
    service_factory,
    manager_bus: MessageBus,
    runtime_dir: str,
    signum: int,  # type: ignore[no-untyped-def]
) -> None:
    sp: ServiceProcess = service_factory()
    async with populated(manager_bus) as (paths, clients):
        sp.process.send_signal(signum)
        rc = await asyncio.to_thread(sp.process.wait, 5)
        assert rc == 0, sp.log()
        assert not any(os.path.exists(p) for p in paths)
        assert sp.sockets() == []
        for c in clients:
            await wait_disconnected(c)


async def test_runtime_dir_holds_no_socket_after_exit(
    service_factory: Any, manager_bus: MessageBus, runtime_dir: str
) -> None:
    sp: ServiceProcess = service_factory()
    containers = os.path.join(runtime_dir, "dbus-1", "containers")
    async with populated(manager_bus) as (_paths, _clients):
        assert len(sockets_under(containers)) == 2
        assert sp.terminate() == 0
        # The minted sockets at once; the fd keeper's (SPEC 13) once it has let go.
        assert sockets_under(containers) == []
        await wait_until(lambda: sockets_under(runtime_dir) == [], "the fd keeper to end")
        assert os.listdir(containers) == []
        assert stat.S_IMODE(os.stat(containers).st_mode) == 0o700


async def test_restart_after_kill_cleans_stale_sockets(
    service_factory: Any, manager_bus: MessageBus, bus: PrivateBus, runtime_dir: str
) -> None:
    """A service killed hard leaves sockets behind; the next instance serves those of the
    servers it brings back (SPEC 13) and removes the others (here: a server whose
    creator left meanwhile, so it would have stopped listening)."""
    sp: ServiceProcess = service_factory()
    creator = await MessageBus(bus_address=bus.address).connect()
    _path, results = await add_server(creator)
    stale = socket_path_of(results)
    _kept_path, kept_results = await add_server(manager_bus, app_id="org.example.Kept")
    kept = socket_path_of(kept_results)
    sp.process.kill()
    sp.process.wait(5)
    assert os.path.exists(stale)
    creator.disconnect()
    await creator.wait_for_disconnect()
    service_factory()
    await wait_until(lambda: not os.path.exists(stale), "the stale socket to be removed")
    assert sockets_under(os.path.dirname(kept)) == [kept]
