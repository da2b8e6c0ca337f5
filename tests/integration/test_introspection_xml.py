"""The shipped interface XML describes exactly what the live service exports."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from tests.conftest import REPO, ServiceProcess, add_server, call, ok

XML = os.path.join(REPO, "data", "dbus-1", "interfaces", "org.freedesktop.DBus.Containers1.xml")


def _members(iface: ET.Element) -> set[tuple[str, str, str]]:
    """(kind, name, signature) of every method/signal/property; arg names do not matter."""
    out: set[tuple[str, str, str]] = set()
    for el in iface:
        if el.tag == "property":
            notes = ",".join(sorted(f"{a.get('name')}={a.get('value')}" for a in el
                                    if a.tag == "annotation"))
            out.add(("property", el.get("name", ""),
                     f"{el.get('type')}:{el.get('access')}:{notes}"))
            continue
        ins = "".join(a.get("type", "") for a in el if a.get("direction", "in") == "in"
                      and el.tag == "method")
        outs = "".join(a.get("type", "") for a in el if a.get("direction") == "out"
                       or el.tag == "signal")
        out.add((el.tag, el.get("name", ""), f"{ins}->{outs}"))
    return out


async def test_shipped_xml_matches_live_introspection(service: ServiceProcess, manager_bus):  # type: ignore[no-untyped-def]
    shipped = {i.get("name"): _members(i) for i in ET.parse(XML).getroot().findall("interface")}
    path, _ = await add_server(manager_bus, named={})
    live: dict[str | None, set[tuple[str, str, str]]] = {}
    for obj in ("/org/freedesktop/DBus/Containers1", path):
        xml = ok(await call(manager_bus, "Introspect", path=obj,
                            interface="org.freedesktop.DBus.Introspectable"))[0]
        for iface in ET.fromstring(xml).findall("interface"):
            if iface.get("name", "").startswith("org.freedesktop.DBus.Containers1"):
                live[iface.get("name")] = _members(iface)
    assert set(shipped) == {"org.freedesktop.DBus.Containers1",
                            "org.freedesktop.DBus.Containers1.Server"}
    assert shipped == live
    # The SPEC's signatures, spelled out so a drift in both places is caught too.
    manager = shipped["org.freedesktop.DBus.Containers1"]
    assert ("method", "AddServer", "sssa{sv}a{sv}->oa{sv}") in manager
    assert ("method", "GetConnectionInfo", "s->oa{sv}sssa{sv}") in manager
    assert ("method", "GetServerInfo", "o->a{sv}sssa{sv}") in manager
    assert ("method", "GetConnectionCredentials", "s->a{sv}") in manager
    assert ("method", "StopServer", "o->") in manager
    assert ("method", "StopListening", "o->") in manager
    assert ("method", "ListServers", "->ao") in manager
    assert ("signal", "ServerRemoved", "->o") in manager
    assert ("property", "SupportedArguments", "as:read:") in manager
    server = shipped["org.freedesktop.DBus.Containers1.Server"]
    emits = "org.freedesktop.DBus.Property.EmitsChangedSignal"
    assert ("property", "MessagesForwarded", f"t:read:{emits}=false") in server
    assert ("property", "Listening", "b:read:") in server  # PropertiesChanged is emitted
