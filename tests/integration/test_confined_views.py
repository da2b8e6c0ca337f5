"""A confined connection sees only its own server: no listing or reading of others."""

from __future__ import annotations

from dbus_fast import Variant

from tests.conftest import ServiceProcess, add_server, call, connect, error, ok
from tests.support.names import PROPS, SERVER_IFACE


async def test_confined_client_cannot_list_or_read_other_servers(
    service: ServiceProcess, manager_bus
):  # type: ignore[no-untyped-def]
    mine, res = await add_server(manager_bus, app_id="org.example.Mine")
    other, _ = await add_server(
        manager_bus, app_id="org.example.Other", metadata={"secret": Variant("s", "x")}
    )
    client = await connect(res["Address"].value)
    try:
        # The launcher sees both; the confined app only its own.
        assert sorted(ok(await call(manager_bus, "ListServers"))[0]) == sorted([mine, other])
        assert ok(await call(client, "ListServers"))[0] == [mine]
        error(
            await call(client, "GetAll", "s", [SERVER_IFACE], path=other, interface=PROPS),
            "AccessDenied",
        )
        error(
            await call(client, "Get", "ss", [SERVER_IFACE, "Metadata"], path=other,
                       interface=PROPS),
            "AccessDenied",
        )
        own = ok(await call(client, "GetAll", "s", [SERVER_IFACE], path=mine, interface=PROPS))
        assert own[0]["AppID"].value == "org.example.Mine"
        # Asking about another server's path, existing or not, gives the same answer.
        error(await call(client, "GetServerInfo", "o", [other]), "AccessDenied")
        error(await call(client, "GetServerInfo", "o", [other + "99"]), "AccessDenied")
        # Asking about another connection, existing or not, gives the same answer too.
        error(await call(client, "GetConnectionInfo", "s", [manager_bus.unique_name]),
              "AccessDenied")
        error(await call(client, "GetConnectionInfo", "s", [":1.9999"]), "AccessDenied")
        error(await call(client, "GetConnectionInfo", "s", ["org.example.Nobody"]),
              "AccessDenied")
        assert ok(await call(client, "GetConnectionInfo", "s", [client.unique_name]))[0] == mine
    finally:
        client.disconnect()


async def test_confined_introspection_lists_only_its_own_server(
    service: ServiceProcess, manager_bus
):  # type: ignore[no-untyped-def]
    import xml.etree.ElementTree as ET

    mine, res = await add_server(manager_bus, app_id="org.example.Mine")
    other, _ = await add_server(manager_bus, app_id="org.example.Other")
    client = await connect(res["Address"].value)
    try:
        def children(xml: str) -> set[str]:
            return {n.get("name", "") for n in ET.fromstring(xml).findall("node")}

        introspectable = "org.freedesktop.DBus.Introspectable"
        host = ok(await call(manager_bus, "Introspect", interface=introspectable))[0]
        assert children(host) == {mine.rsplit("/", 1)[1], other.rsplit("/", 1)[1]}
        confined = ok(await call(client, "Introspect", interface=introspectable))[0]
        assert children(confined) == {mine.rsplit("/", 1)[1]}
        assert "org.freedesktop.DBus.Containers1" in confined
    finally:
        client.disconnect()
