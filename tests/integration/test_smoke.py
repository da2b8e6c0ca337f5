"""A first end-to-end check: mint a socket, connect through it with gdbus, identify the client."""

from __future__ import annotations

import subprocess

from dbus_fast import Variant

from tests.conftest import ServiceProcess, add_server, call, connect, ok


async def test_gdbus_through_minted_socket_is_identified(service: ServiceProcess, manager_bus):  # type: ignore[no-untyped-def]
    path, results = await add_server(manager_bus, metadata={"k": Variant("s", "v")})
    address = results["Address"].value
    assert path == "/org/freedesktop/DBus/Containers1/c0"
    client = await connect(address)
    try:
        info = ok(await call(manager_bus, "GetConnectionInfo", "s", [client.unique_name]))
        assert info[0] == path
        assert info[2:5] == ["org.example.Test", "org.example.App", "instance-1"]
        assert info[5]["k"].value == "v"
        out = subprocess.run(
            ["gdbus", "call", "--address", address, "-d", "org.freedesktop.DBus",
             "-o", "/org/freedesktop/DBus", "-m", "org.freedesktop.DBus.GetId"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        assert len(out.strip().strip("(',)")) == 32
    finally:
        client.disconnect()
