"""A confined client cannot enumerate the other instances through the service's own
objects (SPEC 12, issue 16 finding 5).

dbus-fast answers ``GetManagedObjects`` on any path with every exported object and
broadcasts ``InterfacesAdded`` with all properties of each new server; the service
also broadcasts ``PropertiesChanged`` and ``ServerRemoved``. An attacker behind an
unfiltered server and one behind a filtered server (allowed to talk to the service)
try every way in while a bystander of a third server keeps making round trips: they
see only their own server; an unconfined admin still sees everything.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from tests.conftest import NAME, PATH, ServiceProcess, add_server, call, connect, ok
from tests.integration.budget_helpers import bystander_running, report
from tests.integration.helpers_c1 import add_match, driver_call, socket_path_of
from tests.support.bus import PrivateBus
from tests.support.commands import run_cmd
from tests.support.names import FILTER, POLICY, PROPS, SERVER_IFACE

pytestmark = pytest.mark.timeout(60)

OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"


class Recorder:
    """Every message a connection receives, as text to search for secrets."""

    def __init__(self, bus: MessageBus) -> None:
        """Start recording on ``bus``."""
        self.seen: list[str] = []
        self.signals: list[Message] = []
        bus.add_message_handler(self._record)

    def _record(self, msg: Message) -> None:
        self.seen.append(f"{msg.message_type.name} {msg.path} {msg.member} {msg.body!r}")
        if msg.message_type == MessageType.SIGNAL:
            self.signals.append(msg)

    def leaks(self, secrets: list[str]) -> list[str]:
        """Recorded messages mentioning any of ``secrets``."""
        return [s for s in self.seen if any(x in s for x in secrets)]


async def _probe_everything(bus: MessageBus, other: str) -> list[Message]:
    """Every read the service's objects offer, aimed at ``other`` and at the tree."""
    replies = []
    for path in ("/", "/org/freedesktop/DBus", PATH, other):
        replies.append(await call(bus, "GetManagedObjects", path=path, interface=OBJECT_MANAGER))
    for path in ("/", "/org", "/org/freedesktop/DBus", PATH, other):
        replies.append(await call(bus, "Introspect", path=path, interface=INTROSPECTABLE))
    replies.append(await call(bus, "GetAll", "s", [SERVER_IFACE], path=other, interface=PROPS))
    for prop in ("AppID", "Metadata", "SocketPath", "Creator", "Connections"):
        replies.append(
            await call(bus, "Get", "ss", [SERVER_IFACE, prop], path=other, interface=PROPS)
        )
    replies.append(await call(bus, "GetServerInfo", "o", [other]))
    replies.append(await call(bus, "ListServers"))
    return replies


async def test_confined_clients_see_only_their_own_server(
    service: ServiceProcess, bus: PrivateBus, manager_bus: MessageBus
) -> None:
    plain_path, plain = await add_server(manager_bus, instance_id="attacker-plain")
    filtered_path, filtered = await add_server(
        manager_bus,
        instance_id="attacker-filtered",
        named={FILTER: Variant("b", True), POLICY: Variant("a{ss}", {NAME: "talk"})},
    )
    victim_path, victim = await add_server(
        manager_bus,
        app_id="org.example.Victim",
        instance_id="victim-instance",
        metadata={"secret": Variant("s", "victim-metadata-6b1f")},
    )
    secrets = [
        "org.example.Victim",
        "victim-instance",
        "victim-metadata-6b1f",
        victim_path,
        socket_path_of(victim),
        "org.example.Later",
        "later-metadata-93ac",
    ]
    admin = Recorder(manager_bus)
    await add_match(manager_bus, f"type='signal',sender='{NAME}'")
    attackers: dict[str, tuple[MessageBus, Recorder, str]] = {}
    targets = (("plain", plain, plain_path), ("filtered", filtered, filtered_path))
    for label, results, own in targets:
        conn = await connect(str(results["Address"].value))
        rec = Recorder(conn)
        await add_match(conn, "type='signal'")
        await add_match(conn, f"sender='{NAME}'")
        attackers[label] = (conn, rec, own)
    victim_client = await connect(str(victim["Address"].value))
    try:
        async with bystander_running(victim_client) as by:
            for conn, _rec, _own in attackers.values():
                replies = await _probe_everything(conn, victim_path)
                denied = [r for r in replies if r.message_type == MessageType.ERROR]
                assert all(
                    r.error_name == "org.freedesktop.DBus.Error.AccessDenied" for r in denied
                ), [(r.error_name, r.body) for r in denied]
            # Another instance comes, gets a client, and goes, while they listen.
            later_path, later = await add_server(
                manager_bus,
                app_id="org.example.Later",
                metadata={"secret": Variant("s", "later-metadata-93ac")},
            )
            secrets += [later_path, socket_path_of(later)]
            later_client = await connect(str(later["Address"].value))
            await asyncio.sleep(0.2)  # past the Connections signal's coalescing window
            later_client.disconnect()
            ok(await call(manager_bus, "StopServer", "o", [later_path]))
            for conn, _rec, _own in attackers.values():
                # Whatever the bus queued for them before this reply has arrived.
                ok(await driver_call(conn, "GetId"))
        by.check()
        report("enumeration (finding 5)", by, service.process.pid)
        # The admin saw every signal the attackers did not.
        admin_signals = {m.member for m in admin.signals if m.path == later_path or (
            m.body and m.body[0] == later_path)}
        assert {"InterfacesAdded", "PropertiesChanged"} <= admin_signals, admin_signals
        leaks = {label: rec.leaks(secrets) for label, (_c, rec, _o) in attackers.items()}
        assert leaks == {"plain": [], "filtered": []}, "attackers saw other instances"
        for label, (conn, _rec, own) in attackers.items():
            # Not vacuous: each sees its own server.
            mine = ok(await call(conn, "GetManagedObjects", path="/", interface=OBJECT_MANAGER))
            assert set(mine[0]) == {PATH, own}, (label, mine)
            assert mine[0][own][SERVER_IFACE]["AppID"].value == "org.example.App"
            mine = ok(await call(conn, "GetManagedObjects", path=PATH, interface=OBJECT_MANAGER))
            assert set(mine[0]) == {own}, (label, mine)
    finally:
        for conn, _rec, _own in attackers.values():
            conn.disconnect()
        victim_client.disconnect()


async def test_admin_still_sees_every_server(
    service: ServiceProcess, bus: PrivateBus, manager_bus: MessageBus
) -> None:
    paths = [(await add_server(manager_bus, instance_id=f"i{i}"))[0] for i in range(2)]
    everything = ok(
        await call(manager_bus, "GetManagedObjects", path="/", interface=OBJECT_MANAGER)
    )
    assert set(paths) <= set(everything[0])
    rc, out, err = await run_cmd("busctl", f"--address={bus.address}", "tree", NAME)
    assert rc == 0, err
    for p in paths:
        assert p in out, out
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus.address)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xdg_containers", "list", "--address", bus.address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    out_b, err_b = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err_b
    for p in paths:
        assert p in out_b.decode(), out_b


async def test_service_signals_reach_no_confined_client_even_its_own(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    """The documented price: a confined client does not get PropertiesChanged of its own
    server either (its signals cannot be told apart by the filter); it reads the
    property instead."""
    path, results = await add_server(manager_bus)
    conn = await connect(str(results["Address"].value))
    rec = Recorder(conn)
    await add_match(conn, f"sender='{NAME}'")
    second = await connect(str(results["Address"].value))
    try:
        await asyncio.sleep(0.2)
        ok(await driver_call(conn, "GetId"))
        assert [m.member for m in rec.signals if m.path == path] == []
        names = ok(await call(conn, "Get", "ss", [SERVER_IFACE, "Connections"], path=path,
                              interface=PROPS))
        assert set(names[0].value) == {conn.unique_name, second.unique_name}
    finally:
        conn.disconnect()
        second.disconnect()

