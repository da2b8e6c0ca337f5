"""After kill -9, the next service brings back every server that was listening (SPEC 13).

Same object path, socket path, metadata and policy; a client through the restored
socket is identified as before and filtered as before; only the live connections of
the crashed process are lost. Servers that cannot come back (their creator left, a
launcher's socket or StopOnNotify fd) are dropped with a log line, their records too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from tests.conftest import NAME, add_server, start_service
from tests.integration.test_activation import (  # noqa: F401 (a fixture)
    ActivatableBus,
    _gdbus,
    _owner_pid,
    activatable_bus,
)
from tests.integration.test_registry_on_disk import store_of
from tests.support.bus import PrivateBus
from tests.support.commands import gdbus_call, run_cmd
from tests.support.names import FILTER, SERVER_IFACE

POLICY = "org.freedesktop.XdgContainers1.Policy"
MANAGER = "/org/freedesktop/DBus/Containers1"


async def _info(bus_address: str, unique_name: str) -> str:
    rc, out, err = await gdbus_call(
        bus_address, MANAGER, "org.freedesktop.DBus.Containers1.GetConnectionInfo", unique_name)
    assert rc == 0, err
    return out


async def _through(socket_path: str, *call: str) -> tuple[int, str, str]:
    """dbus-send through a server's socket (a client we did not write)."""
    return await run_cmd(
        "dbus-send", f"--bus=unix:path={socket_path}", "--print-reply",
        "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus", *call)


async def test_kill_9_then_restart_brings_every_listening_server_back(
    service_factory: object, manager_bus: MessageBus, bus: PrivateBus, runtime_dir: str
) -> None:
    first = service_factory()  # type: ignore[operator]
    store = await store_of(bus, runtime_dir)
    # A peer name the filtered server may not see, owned by a plain client of the bus.
    await manager_bus.request_name("org.example.Hidden")
    plain, plain_res = await add_server(
        manager_bus, app_id="org.example.Plain", instance_id="p-1",
        metadata={"Origin": Variant("s", "crash-test")})
    filtered, filt_res = await add_server(
        manager_bus, app_id="org.example.Filtered", instance_id="f-1",
        named={FILTER: Variant("b", True), POLICY: Variant("a{ss}", {"org.example.Seen": "see"})})
    gone, _ = await add_server(manager_bus, app_id="org.example.Stopped")
    rc, _, err = await gdbus_call(bus.address, gone, f"{SERVER_IFACE}.StopListening")
    assert rc == 0, err
    plain_sock = bytes(plain_res["SocketPath"].value).rstrip(b"\0").decode()
    filt_sock = bytes(filt_res["SocketPath"].value).rstrip(b"\0").decode()

    os.kill(first.pid, signal.SIGKILL)
    first.process.wait()
    assert os.path.exists(plain_sock), "a crash leaves the socket file behind"
    assert len(store.load()[0]) == 2

    second = service_factory()  # type: ignore[operator]
    assert "brought back 2 server(s)" in second.log()
    rc, out, err = await gdbus_call(bus.address, MANAGER,
                                    "org.freedesktop.DBus.Containers1.ListServers")
    assert rc == 0, err
    assert plain in out and filtered in out and gone not in out
    rc, out, err = await gdbus_call(bus.address, MANAGER,
                                    "org.freedesktop.DBus.Containers1.GetServerInfo", plain)
    assert rc == 0, err
    assert "org.example.Plain" in out and "'p-1'" in out and "crash-test" in out

    # A client through the restored plain server: identified as that server's.
    rc, out, err = await _through(plain_sock, "org.freedesktop.DBus.GetId")
    assert rc == 0, err
    # The filtered one still hides what its policy does not name.
    rc, out, err = await _through(filt_sock, "org.freedesktop.DBus.ListNames")
    assert rc == 0, err
    assert "org.example.Hidden" not in out
    rc, out, err = await _through(
        filt_sock, "org.freedesktop.DBus.GetNameOwner", "string:org.example.Hidden")
    assert rc != 0 and "NameHasNoOwner" in err

    # New servers never take a restored server's path.
    newer, _ = await add_server(manager_bus, app_id="org.example.Newer")
    numbers = {int(p.rsplit("c", 1)[1]) for p in (plain, filtered)}
    assert int(newer.rsplit("c", 1)[1]) > max(numbers)


@pytest.mark.parametrize("fd_store", [True, False], ids=["keeper", "no-fd-store"])
async def test_restored_server_identifies_its_clients(
    service_factory: Any, manager_bus: MessageBus, bus: PrivateBus, runtime_dir: str,
    fd_store: bool,
) -> None:
    """GetConnectionInfo after the restart names the same path and app for a new client,
    whether the socket was kept (the keeper) or bound again at its path (no fd store)."""
    def start() -> Any:
        return service_factory() if fd_store else no_fd_store(runtime_dir, bus)

    first = start()
    path, res = await add_server(manager_bus, app_id="org.example.Ident", instance_id="i-9")
    sock = bytes(res["SocketPath"].value).rstrip(b"\0").decode()
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait()
    second = start()
    assert ("bound again" in second.log()) != fd_store, second.log()
    client = await MessageBus(bus_address=f"unix:path={sock}").connect()
    try:
        out = await _info(bus.address, str(client.unique_name))
        assert path in out and "org.example.Ident" in out and "'i-9'" in out
    finally:
        client.disconnect()
        if not fd_store:
            assert second.terminate() == 0


def no_fd_store(runtime_dir: str, bus: PrivateBus) -> Any:
    """A service started as under a systemd unit with FileDescriptorStoreMax=0: no fd
    store, so nothing but the records survives a crash."""
    env = dict(os.environ, NOTIFY_SOCKET="@xdgc-test-nobody-listens", FDSTORE="0")
    return start_service(bus.address, runtime_dir, env=env)


async def test_without_fd_store_servers_on_a_launchers_fds_do_not_come_back(
    bus: PrivateBus, runtime_dir: str
) -> None:
    """No fd store: a server whose creator left, or that lived on a launcher's
    StopOnNotify fd, is not brought back; its record goes."""
    first = no_fd_store(runtime_dir, bus)
    store = await store_of(bus, runtime_dir)
    creator = await MessageBus(bus_address=bus.address, negotiate_unix_fd=True).connect()
    await add_server(creator, app_id="org.example.TiedToCreator")
    r, w = os.pipe()
    try:
        await add_server(creator, app_id="org.example.Notify",
                         named={"StopOnDisconnect": Variant("b", False),
                                "StopOnNotify": Variant("h", 0)}, unix_fds=[r])
    finally:
        os.close(r)
    assert "no fd store" in first.log()
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait()
    creator.disconnect()
    await creator.wait_for_disconnect()
    second = no_fd_store(runtime_dir, bus)
    try:
        log = second.log()
        assert "has left the bus" in log and "StopOnNotify" in log, log
        assert store.load() == ([], [])
    finally:
        assert second.terminate() == 0
        os.close(w)


async def test_with_the_fd_keeper_a_stop_on_notify_server_comes_back_and_still_stops(
    service_factory: Any, bus: PrivateBus, runtime_dir: str
) -> None:
    """The keeper held the socket and the launcher's StopOnNotify fd: the server comes
    back on the same socket (same inode), and the launcher's notify still stops it; a
    server whose creator left does not come back."""
    first = service_factory()
    store = await store_of(bus, runtime_dir)
    creator = await MessageBus(bus_address=bus.address, negotiate_unix_fd=True).connect()
    await add_server(creator, app_id="org.example.TiedToCreator")
    r, w = os.pipe()
    try:
        path, res = await add_server(
            creator, app_id="org.example.Notify",
            named={"StopOnDisconnect": Variant("b", False), "StopOnNotify": Variant("h", 0)},
            unix_fds=[r])
    finally:
        os.close(r)
    sock = bytes(res["SocketPath"].value).rstrip(b"\0").decode()
    inode = os.stat(sock).st_ino
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait()
    creator.disconnect()
    await creator.wait_for_disconnect()
    second = service_factory()
    assert "has left the bus" in second.log()
    assert [r.path for r in store.load()[0]] == [path]
    assert os.stat(sock).st_ino == inode
    rc, _, err = await _through(sock, "org.freedesktop.DBus.GetId")
    assert rc == 0, err
    os.close(w)  # the launcher ends: the server stops listening
    deadline = time.monotonic() + 10
    while os.path.exists(sock) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not os.path.exists(sock)
    assert store.load() == ([], [])


def test_the_next_call_activates_a_service_that_brings_the_servers_back(
    activatable_bus: ActivatableBus,  # noqa: F811 (the fixture imported above)
) -> None:
    """kill -9 of an activated service; GetServerInfo on a server of it activates the next
    one, which answers for the same path (the call waits for the restore)."""
    ab = activatable_bus
    r = _gdbus(ab.address, NAME, MANAGER, "org.freedesktop.DBus.Containers1.AddServer",
               "org.example.Type", "org.example.Activated", "a-1", "{}",
               "{'StopOnDisconnect': <false>}")
    assert r.returncode == 0, r.stderr + ab.service_log()
    path = r.stdout.split("'")[1]
    first = _owner_pid(ab.address)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while _owner_pid(ab.address) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    r = _gdbus(ab.address, NAME, MANAGER, "org.freedesktop.DBus.Containers1.GetServerInfo", path)
    assert r.returncode == 0, r.stderr + ab.service_log()
    assert "org.example.Activated" in r.stdout and "'a-1'" in r.stdout
    second = _owner_pid(ab.address)
    assert second is not None and second != first
    os.kill(second, signal.SIGTERM)


async def test_a_crash_in_the_middle_of_add_server_calls_leaves_a_consistent_registry(
    service_factory: object, manager_bus: MessageBus, bus: PrivateBus, runtime_dir: str
) -> None:
    """kill -9 while twenty AddServer calls are in flight: the next service brings back
    exactly the servers whose record was complete, each one working; no partial record,
    no temporary file and no socket without a server is left."""
    first = service_factory()  # type: ignore[operator]
    store = await store_of(bus, runtime_dir)
    calls = [asyncio.ensure_future(add_server(manager_bus, app_id=f"org.example.Burst{i}"))
             for i in range(20)]
    await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait()
    await asyncio.wait(calls)
    records, problems = store.load()
    assert problems == []
    assert not [n for n in os.listdir(store.directory) if ".tmp-" in n]
    second = service_factory()  # type: ignore[operator]
    rc, out, err = await gdbus_call(bus.address, MANAGER,
                                    "org.freedesktop.DBus.Containers1.ListServers")
    assert rc == 0, err
    assert sorted(r.path for r in records) == sorted(
        p for p in out.replace("'", " ").split() if p.startswith(MANAGER + "/c")), second.log()
    for record in records:
        assert record.socket_path is not None
        rc, _, err = await _through(record.socket_path, "org.freedesktop.DBus.GetId")
        assert rc == 0, err
    socks = os.listdir(os.path.join(runtime_dir, "dbus-1", "containers"))
    assert sorted(socks) == sorted(os.path.basename(str(r.socket_path)) for r in records)


async def test_replace_with_nothing_running_is_a_plain_start_that_restores(
    service_factory: object, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    """ExecReload after a crash: `serve --replace` finds no service and starts as the
    next activation would, bringing the servers back."""
    first = service_factory()  # type: ignore[operator]
    path, _ = await add_server(manager_bus, app_id="org.example.Reloaded")
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait()
    second = service_factory("--replace")  # type: ignore[operator]
    assert "brought back 1 server(s)" in second.log()
    rc, out, err = await gdbus_call(bus.address, MANAGER,
                                    "org.freedesktop.DBus.Containers1.ListServers")
    assert rc == 0 and path in out, err
