"""The registry on disk follows the live one (SPEC 13 groundwork), driven by gdbus.

Each listening server has a private record in ``$XDG_RUNTIME_DIR/xdg-containers/servers/
<bus id>/``: written at AddServer, rewritten by SetPolicy, removed when the server stops
listening. What is written reads back as a valid record with the server's identity.
"""

from __future__ import annotations

import os
import stat

from dbus_fast.aio import MessageBus

from tests.conftest import ServiceProcess, add_server
from tests.support.bus import PrivateBus
from tests.support.commands import gdbus_call, run_cmd
from tests.support.names import FILTER, SERVER_IFACE
from xdg_containers.servers.store import RegistryStore


async def store_of(bus: PrivateBus, runtime_dir: str) -> RegistryStore:
    """The store the service keeps for ``bus`` (named by the bus's id)."""
    rc, out, err = await run_cmd(
        "dbus-send", f"--bus={bus.address}", "--print-reply=literal", "--dest=org.freedesktop.DBus",
        "/org/freedesktop/DBus", "org.freedesktop.DBus.GetId",
    )
    assert rc == 0, err
    return RegistryStore(os.path.join(runtime_dir, "xdg-containers", "servers", out.strip()))


async def test_records_follow_add_set_policy_and_stop_listening(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus, runtime_dir: str
) -> None:
    store = await store_of(bus, runtime_dir)
    rc, out, err = await gdbus_call(
        bus.address, "/org/freedesktop/DBus/Containers1",
        "org.freedesktop.DBus.Containers1.AddServer", "org.example.Type", "org.example.Kept",
        "instance-7", "{'Origin': <'tests'>, 'Nested': <{'n': <uint32 7>}>}",
        "{'StopOnDisconnect': <false>}",
    )
    assert rc == 0, err
    path = out.split("'")[1]
    records, problems = store.load()
    assert problems == []
    (rec,) = records
    assert (rec.path, rec.container_type, rec.app_id, rec.instance_id) == (
        path, "org.example.Type", "org.example.Kept", "instance-7")
    assert rec.metadata["Origin"].value == "tests"
    assert rec.metadata["Nested"].value["n"].value == 7
    assert rec.socket_path is not None and os.path.exists(rec.socket_path)
    assert rec.policy_arguments == {} and rec.stop_on_disconnect is False
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    (name,) = os.listdir(store.directory)
    assert stat.S_IMODE(os.stat(os.path.join(store.directory, name)).st_mode) == 0o600

    rc, _, err = await gdbus_call(
        bus.address, path, f"{SERVER_IFACE}.SetPolicy",
        f"{{'{FILTER}': <true>, 'org.freedesktop.XdgContainers1.Policy': "
        "<{'org.example.Peer': 'talk'}>}",
    )
    assert rc == 0, err
    (rec,) = store.load()[0]
    assert rec.policy_arguments[FILTER].value is True
    assert rec.policy_arguments["org.freedesktop.XdgContainers1.Policy"].value == {
        "org.example.Peer": "talk"}

    other, _ = await add_server(manager_bus, app_id="org.example.Second")
    assert [r.path for r in store.load()[0]] == [path, other]
    rc, _, err = await gdbus_call(bus.address, path, f"{SERVER_IFACE}.StopListening")
    assert rc == 0, err
    assert [r.path for r in store.load()[0]] == [other]
    rc, _, err = await gdbus_call(bus.address, other, f"{SERVER_IFACE}.Stop")
    assert rc == 0, err
    assert store.load() == ([], [])


async def test_a_clean_stop_leaves_no_record(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus, runtime_dir: str
) -> None:
    """SIGTERM stops every server first: nothing is left to bring back (only a crash
    leaves records)."""
    store = await store_of(bus, runtime_dir)
    await add_server(manager_bus, app_id="org.example.One")
    await add_server(manager_bus, app_id="org.example.Two")
    assert len(store.load()[0]) == 2
    assert service.stop() == 0
    assert store.load() == ([], [])
