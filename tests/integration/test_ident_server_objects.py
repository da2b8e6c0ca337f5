"""Server objects admins can see: org.freedesktop.DBus.Containers1.Server (SPEC §6).

Seen with the tools an admin has (busctl, gdbus), and with dbus-fast for values and
PropertiesChanged.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from tests.conftest import (
    NAME,
    PATH,
    ServiceProcess,
    add_server,
    call,
    confined_client,
    connect,
    error,
    ok,
)
from tests.integration import helpers_c1 as c1
from tests.integration.helpers_c1 import Observer, driver_call, list_servers, socket_path_of
from tests.support.bus import PrivateBus
from tests.support.commands import NOBODY, gdbus_call, run_cmd
from tests.support.names import FILTER, PROPS, SERVER_IFACE

pytestmark = pytest.mark.timeout(60)

EMITS = "org.freedesktop.DBus.Property.EmitsChangedSignal"

#: SPEC §6: every property and its signature.
SPEC_PROPERTIES = {
    "ContainerType": "s",
    "AppID": "s",
    "InstanceID": "s",
    "Metadata": "a{sv}",
    "Creator": "a{sv}",
    "Address": "s",
    "SocketPath": "ay",
    "Listening": "b",
    "Connections": "as",
    "MessagesForwarded": "t",
    "MessagesDenied": "t",
}
#: SPEC §6: methods and their input signatures.
SPEC_METHODS = {"Stop": "", "StopListening": "", "SetPolicy": "a{sv}"}
#: Properties SPEC §6 says emit PropertiesChanged.
EMITTING = {"Listening", "Connections"}

HIDDEN = "org.example.IdentHidden"
PEER_IFACE = "org.example.IdentPeer"


async def watch_properties(obs: Observer, path: str) -> None:
    """Let ``obs`` record PropertiesChanged of the server object at ``path``."""
    await c1.add_match(
        obs.bus,
        f"type='signal',sender='{NAME}',path='{path}',interface='{PROPS}',"
        "member='PropertiesChanged'",
    )


def changes(obs: Observer, path: str) -> list[dict[str, Any]]:
    """The changed-properties dicts of every PropertiesChanged seen for ``path``, in order."""
    out = []
    for e in obs.signals(PROPS, "PropertiesChanged"):
        _iface, _member, p, body = e.args
        if p == path:
            assert body[0] == SERVER_IFACE, body
            out.append({k: v.value for k, v in body[1].items()})
    return out


async def get_all(bus: MessageBus, path: str) -> dict[str, Any]:
    """Properties.GetAll on a server object, values unwrapped."""
    props = ok(await call(bus, "GetAll", "s", [SERVER_IFACE], path=path, interface=PROPS))[0]
    return {k: v.value for k, v in props.items()}


async def get(bus: MessageBus, path: str, prop: str) -> Any:
    """Properties.Get on a server object, unwrapped."""
    return ok(await call(bus, "Get", "ss", [SERVER_IFACE, prop], path=path, interface=PROPS))[
        0
    ].value


async def obj_call(
    bus: MessageBus, path: str, member: str, signature: str = "", body: list[Any] | None = None
) -> Message:
    """Call a method of the server object at ``path``."""
    return await call(bus, member, signature, body, path=path, interface=SERVER_IFACE)


# -- introspection with the admin's tools -------------------------------------------------------


async def test_busctl_introspect_shows_every_spec_member(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    path, _results = await add_server(manager_bus)
    rc, out, err = await run_cmd("busctl", f"--address={bus.address}", "introspect", NAME, path)
    assert rc == 0, err
    rows: dict[str, tuple[str, str]] = {}
    in_iface = False
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 3 and cols[1] == "interface":
            in_iface = cols[0] == SERVER_IFACE
        elif in_iface and cols and cols[0].startswith("."):
            rows[cols[0][1:]] = (cols[1], cols[2])
    assert in_iface or rows, out
    for prop, sig in SPEC_PROPERTIES.items():
        assert rows.get(prop) == ("property", sig), (prop, rows.get(prop), out)
    for method, sig in SPEC_METHODS.items():
        assert rows.get(method) == ("method", sig or "-"), (method, rows.get(method), out)
    # The XML busctl reads: read-only properties, SetPolicy's single a{sv} argument.
    rc, xml, err = await run_cmd(
        "busctl", f"--address={bus.address}", "introspect", "--xml-interface", NAME, path
    )
    assert rc == 0, err
    root = ET.fromstring(xml)
    (iface,) = [i for i in root.findall("interface") if i.get("name") == SERVER_IFACE]
    props = {p.get("name"): (p.get("type"), p.get("access")) for p in iface.findall("property")}
    assert props == {k: (v, "read") for k, v in SPEC_PROPERTIES.items()}
    methods = {
        m.get("name"): [(a.get("type"), a.get("direction", "in")) for a in m.findall("arg")]
        for m in iface.findall("method")
    }
    assert methods == {"Stop": [], "StopListening": [], "SetPolicy": [("a{sv}", "in")]}


async def test_gdbus_introspect_shows_every_spec_member(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    path, results = await add_server(manager_bus, app_id="org.example.Shown")
    rc, out, err = await run_cmd(
        "gdbus", "introspect", "--address", bus.address, "-d", NAME, "-o", path
    )
    assert rc == 0, err
    start = out.index(f"interface {SERVER_IFACE} {{")
    block = out[start : out.index("\n  };", start)]
    for prop, sig in SPEC_PROPERTIES.items():
        assert re.search(rf"readonly {re.escape(sig)} {prop} = ", block), (prop, block)
    assert re.search(r"SetPolicy\(in\s+a\{sv\} \w+\);", block), block
    assert "Stop();" in block and "StopListening();" in block, block
    assert "readonly s AppID = 'org.example.Shown';" in block
    assert f"readonly s Address = '{results['Address'].value}';" in block
    assert "readonly b Listening = true;" in block


async def test_property_change_annotations_tell_the_truth(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    """A property with no EmitsChangedSignal annotation promises PropertiesChanged (the D-Bus
    spec's default), so GDBusProxy and busctl cache it. Listening/Connections do emit; the
    counters change without a signal, so they must not claim it (``false``), or a cached
    admin view shows stale counters forever."""
    path, _ = await add_server(manager_bus)
    xml = ok(
        await call(
            manager_bus, "Introspect", path=path, interface="org.freedesktop.DBus.Introspectable"
        )
    )[0]
    (iface,) = [i for i in ET.fromstring(xml).findall("interface") if i.get("name") == SERVER_IFACE]
    annotation = {}
    for p in iface.findall("property"):
        value = "true"
        for a in p.findall("annotation"):
            if a.get("name") == EMITS:
                value = a.get("value", "true")
        annotation[p.get("name")] = value
    for prop in EMITTING:
        assert annotation[prop] == "true", (prop, annotation)
    for prop in ("MessagesForwarded", "MessagesDenied"):
        assert annotation[prop] in ("false", "invalidates"), (
            f"{prop} changes without PropertiesChanged but its introspection says "
            f"EmitsChangedSignal={annotation[prop]}"
        )


# -- the object tree follows the servers ------------------------------------------------------


async def tree(bus: PrivateBus) -> list[str]:
    """``busctl tree --list`` of the service."""
    rc, out, err = await run_cmd("busctl", f"--address={bus.address}", "tree", "--list", NAME)
    assert rc == 0, err
    return out.split()


async def test_tree_lists_server_paths_and_objects_vanish_with_their_servers(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus, observer: Observer
) -> None:
    assert [p for p in await tree(bus) if p.startswith(PATH + "/")] == []
    p0, _ = await add_server(manager_bus, instance_id="one")
    p1, r1 = await add_server(manager_bus, instance_id="two")
    assert [p for p in await tree(bus) if p.startswith(PATH + "/")] == [p0, p1]
    rc, out, _ = await run_cmd("busctl", f"--address={bus.address}", "tree", NAME)
    assert rc == 0 and p0 in out and p1 in out, out
    assert await list_servers(manager_bus) == [p0, p1]

    # Stopped at once (no connections): the object is gone with the ServerRemoved signal.
    ok(await call(manager_bus, "StopServer", "o", [p0]))
    await observer.wait_removed(p0)
    assert [p for p in await tree(bus) if p.startswith(PATH + "/")] == [p1]
    gone = await call(manager_bus, "GetAll", "s", [SERVER_IFACE], path=p0, interface=PROPS)
    assert gone.message_type == MessageType.ERROR, gone.body
    # docs/interface.md: reading a property of a removed server is UnknownObject.
    assert gone.error_name == "org.freedesktop.DBus.Error.UnknownObject", gone.error_name
    stop_gone = await obj_call(manager_bus, p0, "Stop")
    assert error(stop_gone, "NotContainer") == f"{p0} is not a live container server"
    rc, out, _ = await run_cmd(
        "gdbus", "introspect", "--address", bus.address, "-d", NAME, "-o", p0
    )
    assert SERVER_IFACE not in out

    # A server that stopped listening keeps its object while a connection lives.
    client = await connect(r1["Address"].value)
    ok(await call(manager_bus, "StopListening", "o", [p1]))
    assert [p for p in await tree(bus) if p.startswith(PATH + "/")] == [p1]
    assert await get(manager_bus, p1, "Listening") is False
    client.disconnect()
    await observer.wait_removed(p1)
    assert [p for p in await tree(bus) if p.startswith(PATH + "/")] == []
    assert await list_servers(manager_bus) == []

    # Paths are not reused: the next server is c2, and it appears in the tree.
    p2, _ = await add_server(manager_bus)
    assert p2 == PATH + "/c2"
    assert [p for p in await tree(bus) if p.startswith(PATH + "/")] == [p2]


# -- values --------------------------------------------------------------------------------


async def test_property_values(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    metadata = {"DesktopFile": Variant("s", "org.example.Vals.desktop"), "n": Variant("u", 7)}
    path, results = await add_server(
        manager_bus, "org.example.Kind", "org.example.Vals", "inst-9", metadata=metadata
    )
    props = await get_all(manager_bus, path)
    assert set(props) == set(SPEC_PROPERTIES)
    assert props["ContainerType"] == "org.example.Kind"
    assert props["AppID"] == "org.example.Vals"
    assert props["InstanceID"] == "inst-9"
    assert props["Metadata"] == metadata
    assert props["Address"] == results["Address"].value
    assert props["SocketPath"] == results["SocketPath"].value
    assert os.fsdecode(bytes(props["SocketPath"][:-1])) == socket_path_of(results)
    assert props["Listening"] is True
    assert props["Connections"] == []
    assert props["MessagesForwarded"] == 0
    assert props["MessagesDenied"] == 0
    # Creator: what the bus said about the AddServer caller; GetServerInfo agrees.
    reply = await driver_call(
        manager_bus, "GetConnectionCredentials", "s", [manager_bus.unique_name]
    )
    c1.close_fds(reply)
    bus_says = {k: v for k, v in ok(reply)[0].items() if k != "ProcessFD"}
    assert props["Creator"] == bus_says
    info = ok(await call(manager_bus, "GetServerInfo", "o", [path]))
    assert info[0] == bus_says
    assert info[1:4] == ["org.example.Kind", "org.example.Vals", "inst-9"]
    assert info[4] == metadata

    # Connections lists the confined clients' unique names, as the bus knows them.
    a = await connect(results["Address"].value)
    b = await connect(results["Address"].value)
    try:
        assert sorted(await get(manager_bus, path, "Connections")) == sorted(
            [a.unique_name, b.unique_name]
        )
        for c in (a, b):
            info = ok(await call(manager_bus, "GetConnectionInfo", "s", [c.unique_name]))
            assert info[0] == path
        # busctl shows the same list.
        rc, out, err = await run_cmd(
            "busctl",
            f"--address={bus.address}",
            "get-property",
            NAME,
            path,
            SERVER_IFACE,
            "Connections",
        )
        assert rc == 0, err
        assert out.split()[:2] == ["as", "2"] and a.unique_name in out and b.unique_name in out
    finally:
        a.disconnect()
    await wait_until_connections(manager_bus, path, [b.unique_name])
    b.disconnect()
    await wait_until_connections(manager_bus, path, [])


async def wait_until_connections(bus: MessageBus, path: str, expected: list[str]) -> None:
    """Poll the Connections property (through the bus) until it equals ``expected``."""
    for _ in range(300):
        if sorted(await get(bus, path, "Connections")) == sorted(expected):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(
        f"Connections never became {expected}: {await get(bus, path, 'Connections')}"
    )


async def test_counters_count_forwarded_and_denied_messages(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    hidden = await connect(bus.address)
    try:
        assert (await hidden.request_name(HIDDEN)).value == 1
        # Unfiltered: traffic is forwarded and counted, nothing is denied.
        async with confined_client(manager_bus, instance_id="plain") as (plain, _, c):
            before = await get_all(manager_bus, plain)
            assert before["MessagesForwarded"] >= 2  # Hello and its reply at least
            for _ in range(5):
                ok(await driver_call(c, "GetId"))
            after = await get_all(manager_bus, plain)
            assert after["MessagesForwarded"] >= before["MessagesForwarded"] + 10
            assert after["MessagesDenied"] == 0
            # Even unfiltered, BecomeMonitor is refused: that is a denial.
            error(await driver_call(c, "BecomeMonitor", "asu", [[], 0]), "AccessDenied")
            assert await get(manager_bus, plain, "MessagesDenied") == 1

        # Filtered: a call to a hidden name is denied and counted as such.
        filtered, f_res = await add_server(
            manager_bus, instance_id="filtered", named={FILTER: Variant("b", True)}
        )
        f = await connect(f_res["Address"].value)
        try:
            base = await get_all(manager_bus, filtered)
            assert base["MessagesDenied"] == 0
            reply = await call(f, "Ping", destination=HIDDEN, path="/", interface=PEER_IFACE)
            error(reply, "ServiceUnknown")
            mid = await get_all(manager_bus, filtered)
            assert mid["MessagesDenied"] == base["MessagesDenied"] + 1
            for _ in range(3):
                error(
                    await call(f, "Ping", destination=HIDDEN, path="/", interface=PEER_IFACE),
                    "ServiceUnknown",
                )
            end = await get_all(manager_bus, filtered)
            assert end["MessagesDenied"] == mid["MessagesDenied"] + 3
            # Denied calls never reached the bus, so they are not counted as forwarded.
            ok(await driver_call(f, "GetId"))
            fin = await get_all(manager_bus, filtered)
            assert fin["MessagesForwarded"] == end["MessagesForwarded"] + 2
            # The other server's counters are its own.
            assert await get(manager_bus, plain, "MessagesDenied") == 1
        finally:
            f.disconnect()
    finally:
        hidden.disconnect()


# -- PropertiesChanged -----------------------------------------------------------------------


async def test_properties_changed_for_connections_and_listening(
    service: ServiceProcess, manager_bus: MessageBus, observer: Observer
) -> None:
    path, results = await add_server(manager_bus)
    await watch_properties(observer, path)
    a = await connect(results["Address"].value)
    await observer.wait_for(
        lambda: {"Connections": [a.unique_name]} in changes(observer, path), "Connections [a]"
    )
    b = await connect(results["Address"].value)
    await observer.wait_for(
        lambda: any(
            sorted(c.get("Connections", [])) == sorted([a.unique_name, b.unique_name])
            for c in changes(observer, path)
        ),
        "Connections [a, b]",
    )
    a.disconnect()
    await observer.wait_for(
        lambda: changes(observer, path)[-1:] == [{"Connections": [b.unique_name]}],
        "Connections [b]",
    )
    # StopListening: Listening goes false; the server lives on with b.
    ok(await call(manager_bus, "StopListening", "o", [path]))
    await observer.wait_for(
        lambda: {"Listening": False} in changes(observer, path), "Listening false"
    )
    assert await get(manager_bus, path, "Listening") is False
    # Every change seen matches a property SPEC §6 says emits, with its right value type.
    for c in changes(observer, path):
        assert set(c) <= EMITTING, c
    # Last connection leaves: the server is removed.
    b.disconnect()
    await observer.wait_removed(path)


async def test_connections_signals_are_coalesced_and_never_repeat_a_value(
    service: ServiceProcess, manager_bus: MessageBus, observer: Observer
) -> None:
    """A burst of connections (an app starting its helpers) costs a few signals, not two
    per connection; each signal carries a new value, and the last one the final list."""
    path, results = await add_server(manager_bus)
    await watch_properties(observer, path)
    keeper = await connect(results["Address"].value)
    clients = await asyncio.gather(*(connect(results["Address"].value) for _ in range(8)))
    for c in clients:
        c.disconnect()
    await observer.wait_for(
        lambda: changes(observer, path)[-1:] == [{"Connections": [keeper.unique_name]}],
        "Connections [keeper] after the burst",
    )
    await asyncio.sleep(0.2)  # nothing more is coming
    seen = [c["Connections"] for c in changes(observer, path) if "Connections" in c]
    assert seen[-1] == [keeper.unique_name]
    assert len(seen) < 2 * (len(clients) + 1), seen
    assert all(x != y for x, y in itertools.pairwise(seen)), seen
    keeper.disconnect()
    await observer.wait_for(
        lambda: changes(observer, path)[-1:] == [{"Connections": []}], "Connections []"
    )


async def test_properties_changed_for_listening_via_the_object(
    service: ServiceProcess, manager_bus: MessageBus, observer: Observer
) -> None:
    """StopListening on the server object, through a dbus-fast proxy object, as an admin
    tool would; the signal arrives on the proxy interface's ``on_properties_changed``."""
    async with confined_client(manager_bus) as (path, _, client):
        xml = ok(
            await call(
                manager_bus,
                "Introspect",
                path=path,
                interface="org.freedesktop.DBus.Introspectable",
            )
        )[0]
        proxy = manager_bus.get_proxy_object(NAME, path, xml)
        props_iface = proxy.get_interface(PROPS)
        server_iface = proxy.get_interface(SERVER_IFACE)
        seen: asyncio.Queue[tuple[str, dict[str, Variant], list[str]]] = asyncio.Queue()
        props_iface.on_properties_changed(  # type: ignore[attr-defined]
            lambda iface, changed, invalidated: seen.put_nowait((iface, changed, invalidated))
        )
        assert await server_iface.get_listening() is True  # type: ignore[attr-defined]
        await server_iface.call_stop_listening()  # type: ignore[attr-defined]
        iface, changed, _ = await asyncio.wait_for(seen.get(), 5)
        assert iface == SERVER_IFACE
        assert changed == {"Listening": Variant("b", False)}
        assert await server_iface.get_listening() is False  # type: ignore[attr-defined]
        # A second StopListening is a harmless no-op, and announces nothing new.
        await server_iface.call_stop_listening()  # type: ignore[attr-defined]
        ok(await driver_call(client, "GetId"))  # the connection still works
    await observer.wait_removed(path)


# -- Stop / StopListening on the object, with the manager's rules -----------------------------


async def test_object_stop_listening_and_stop(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus, observer: Observer
) -> None:
    path, results = await add_server(manager_bus)
    socket_path = socket_path_of(results)
    client = await connect(results["Address"].value)
    # busctl can call it (no arguments).
    rc, _out, err = await run_cmd(
        "busctl", f"--address={bus.address}", "call", NAME, path, SERVER_IFACE, "StopListening"
    )
    assert rc == 0, err
    await c1.wait_until(lambda: not os.path.exists(socket_path), "the socket to be unlinked")
    assert await get(manager_bus, path, "Listening") is False
    ok(await driver_call(client, "GetId"))  # existing connection carries on
    ok(await obj_call(manager_bus, path, "StopListening"))  # again: no-op success
    assert await list_servers(manager_bus) == [path]
    # Stop: the connection is dropped, the server removed, ServerRemoved before the reply.
    ok(await obj_call(manager_bus, path, "Stop"))
    await observer.wait_removed(path)
    await c1.wait_disconnected(client)
    assert await list_servers(manager_bus) == []


async def test_object_methods_refuse_confined_callers(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    own, own_res = await add_server(manager_bus, instance_id="own")
    other, _ = await add_server(manager_bus, instance_id="other")
    confined = await connect(own_res["Address"].value)
    try:
        for path in (own, other):
            for member, sig, body in (
                ("Stop", "", []),
                ("StopListening", "", []),
                ("SetPolicy", "a{sv}", [{FILTER: Variant("b", False)}]),
            ):
                error(await obj_call(confined, path, member, sig, body), "AccessDenied")
        # A confined client may read its own server object, not another's.
        assert await get(confined, own, "AppID") == "org.example.App"
        error(
            await call(confined, "GetAll", "s", [SERVER_IFACE], path=other, interface=PROPS),
            "AccessDenied",
        )
        # Nothing was stopped.
        assert await list_servers(manager_bus) == [own, other]
        assert await get(manager_bus, own, "Listening") is True
        assert await get(manager_bus, other, "Listening") is True
        ok(await driver_call(confined, "GetId"))
    finally:
        confined.disconnect()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to call as another uid")
async def test_object_methods_refuse_another_uid(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    path, _ = await add_server(manager_bus)
    mode = os.stat(bus.tmpdir).st_mode
    os.chmod(bus.tmpdir, 0o711)  # the bus socket is 0777, its dir 0700
    try:
        for member, args in (("Stop", []), ("StopListening", []), ("SetPolicy", ["{}"])):
            rc, out, err = await gdbus_call(
                bus.address, path, f"{SERVER_IFACE}.{member}",
                *args,
                nobody=True,
            )
            assert rc != 0, f"uid {NOBODY} could {member}: {out}"
            assert "org.freedesktop.DBus.Error.AccessDenied" in err, err
    finally:
        os.chmod(bus.tmpdir, mode & 0o7777)
    assert await get(manager_bus, path, "Listening") is True
    assert await list_servers(manager_bus) == [path]


async def test_object_methods_on_a_stopped_server_are_gone(
    service: ServiceProcess, manager_bus: MessageBus, observer: Observer
) -> None:
    """After removal, the manager and the server's own methods answer NotContainer
    naming the path (docs/interface.md), not the UnknownObject of an unexported path."""
    path, _ = await add_server(manager_bus)
    ok(await obj_call(manager_bus, path, "Stop"))
    await observer.wait_removed(path)
    error(await call(manager_bus, "StopServer", "o", [path]), "NotContainer")
    error(await call(manager_bus, "StopListening", "o", [path]), "NotContainer")
    for member in ("Stop", "StopListening"):
        reply = await obj_call(manager_bus, path, member)
        assert error(reply, "NotContainer") == f"{path} is not a live container server"
