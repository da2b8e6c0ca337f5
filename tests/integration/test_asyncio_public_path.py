"""The service proxies with the dispatching selector on asyncio's public API only
(XDG_CONTAINERS_ASYNCIO_PUBLIC=1): the path taken when a Python release changes the loop
fields compat/aio.py peeks at."""

from __future__ import annotations

import os

from dbus_fast import Message

from tests.conftest import add_server, call, connect, ok, start_service
from xdg_containers.compat.aio import PUBLIC_ENV
from xdg_containers.privatebus import PrivateBus


async def test_proxying_on_the_public_asyncio_path(bus: PrivateBus, runtime_dir: str) -> None:
    service = start_service(bus.address, runtime_dir, env={**os.environ, PUBLIC_ENV: "1"})
    try:
        manager = await connect(bus.address)
        try:
            path, results = await add_server(manager, named={})
            client = await connect(results["Address"].value)
            try:
                for _ in range(200):
                    reply = await client.call(Message(
                        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                        interface="org.freedesktop.DBus", member="GetId"))
                    assert reply is not None and len(reply.body[0]) == 32
                info = ok(await call(manager, "GetConnectionInfo", "s", [client.unique_name]))
                assert info[0] == path
            finally:
                client.disconnect()
        finally:
            manager.disconnect()
        assert "uses asyncio's public API only" in service.log(), service.log()
    finally:
        assert service.terminate() == 0, service.log()
        os.unlink(service.log_path)
