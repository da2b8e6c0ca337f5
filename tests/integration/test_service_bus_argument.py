"""The ``org.freedesktop.XdgContainers1.Bus`` argument (SPEC 3; issue 16 findings 9, 10).

- An address nobody listens on is refused by AddServer, naming the address and
  why (it used to be accepted; every client of the server then got a reset and
  the log did not say where it had tried to go).
- The service's own bus spelled another way (no ``guid=``, keys reordered, the
  path %-escaped) is still the service's bus: its clients are identified.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from tests.conftest import ServiceProcess, add_server, call, confined_client, connect, error, ok
from tests.integration.budget_helpers import bystander_running, report
from tests.support.bus import PrivateBus
from tests.support.commands import gdbus_call, run_cmd
from tests.support.names import BUS_ARG, MANAGER, MANAGER_PATH
from xdg_containers.wire.address import parse_address

pytestmark = pytest.mark.timeout(60)



@pytest.fixture
def dead_socket() -> Iterator[str]:
    """A socket file nobody listens on (bound, then closed)."""
    with tempfile.TemporaryDirectory(prefix="xdgc-dead-") as d:
        path = os.path.join(d, "sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(path)
        yield path


def _unused_tcp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()  # not listening: a connection is refused
    return port


async def test_unreachable_bus_is_invalid_args(
    service: ServiceProcess, bus: PrivateBus, manager_bus: MessageBus, dead_socket: str
) -> None:
    port = _unused_tcp_port()
    missing = os.path.join(os.path.dirname(dead_socket), "missing")
    _path, results = await add_server(manager_bus, instance_id="bystander")
    bystander = await connect(str(results["Address"].value))
    try:
        async with bystander_running(bystander) as by:
            rc, _out, err = await gdbus_call(
                bus.address, MANAGER_PATH, f"{MANAGER}.AddServer",
                "org.example.T", "org.example.App", "i", "{}",
                f"{{'{BUS_ARG}': <'unix:path={missing}'>}}",
            )
            assert rc != 0
            assert "org.freedesktop.DBus.Error.InvalidArgs" in err, err
            assert f"unix:path={missing}" in err and "No such file or directory" in err, err
            rc, _out, err = await run_cmd(
                "busctl", f"--address={bus.address}", "call", MANAGER, MANAGER_PATH, MANAGER,
                "AddServer",
                "sssa{sv}a{sv}", "org.example.T", "org.example.App", "i", "0",
                "1", BUS_ARG, "s", f"unix:path={dead_socket}",
            )
            assert rc != 0
            assert f"unix:path={dead_socket}" in err and "Connection refused" in err, err
            text = error(
                await call(
                    manager_bus, "AddServer", "sssa{sv}a{sv}",
                    ["org.example.T", "a", "i", {},
                     {BUS_ARG: Variant("s", f"tcp:host=127.0.0.1,port={port}")}],
                ),
                "InvalidArgs",
            )
            assert text == (
                f"{BUS_ARG}: nobody listens on 'tcp:host=127.0.0.1,port={port}' "
                f"(tcp:host=127.0.0.1,port={port}: Connection refused)"
            ), text
        by.check()
        report("unreachable Bus (finding 9)", by, service.process.pid)
        assert len(ok(await call(manager_bus, "ListServers"))[0]) == 1
    finally:
        bystander.disconnect()


async def test_bus_with_a_dead_entry_first_is_accepted(
    service: ServiceProcess, bus: PrivateBus, manager_bus: MessageBus, dead_socket: str
) -> None:
    """As a client does, the service uses the first entry that answers."""
    named = {BUS_ARG: Variant("s", f"unix:path={dead_socket};{bus.address}")}
    async with confined_client(manager_bus, named=named) as (path, _, client):
        info = ok(await call(manager_bus, "GetConnectionInfo", "s", [client.unique_name]))
        assert info[0] == path


def _spellings(address: str) -> list[str]:
    (entry,) = parse_address(address)
    p, guid = entry.params["path"], entry.params["guid"]
    escaped = "".join(f"%{b:02x}" for b in os.fsencode(p))
    return [
        f"unix:path={p}",
        f"unix:guid={guid},path={p}",
        f"unix:guid={guid.upper()},path={escaped}",
        f"unix:path={os.path.dirname(p)}/./{os.path.basename(p)}",
    ]


@pytest.mark.parametrize("spelling", range(4))
async def test_service_bus_spelled_differently_still_identifies(
    service: ServiceProcess, bus: PrivateBus, manager_bus: MessageBus, spelling: int
) -> None:
    address = _spellings(bus.address)[spelling]
    assert address != bus.address
    _other, other = await add_server(manager_bus, instance_id="bystander")
    bystander = await connect(str(other["Address"].value))
    client = None
    try:
        async with bystander_running(bystander) as by:
            path, results = await add_server(
                manager_bus, named={BUS_ARG: Variant("s", address)}
            )
            client = await connect(str(results["Address"].value))
            info = ok(await call(manager_bus, "GetConnectionInfo", "s", [client.unique_name]))
            assert info[0] == path, info
            # The client is confined: no nesting, whatever the spelling.
            error(
                await call(
                    client, "AddServer", "sssa{sv}a{sv}", ["org.example.T", "a", "i", {}, {}]
                ),
                "AccessDenied",
            )
        by.check()
        report(f"Bus spelled differently #{spelling} (finding 10)", by, service.process.pid)
    finally:
        if client is not None:
            client.disconnect()
        bystander.disconnect()
