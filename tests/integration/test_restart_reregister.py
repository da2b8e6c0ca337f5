"""A launcher calling AddServer again with the socket a server already listens on gets
that server back (the drop-in re-registering after a restart), never a second server on
one socket; a socket served for another app instance is refused (SPEC 13)."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from dbus_fast import MessageType, Variant
from dbus_fast.aio import MessageBus

from tests.conftest import add_server, add_server_reply
from tests.support.bus import PrivateBus
from tests.support.commands import gdbus_call
from tests.support.rawconn import RawConn

LISTEN_FD = "org.freedesktop.XdgContainers1.ListenFD"
MANAGER = "/org/freedesktop/DBus/Containers1"
IFACE = "org.freedesktop.DBus.Containers1"


def _listening(tmp: str) -> tuple[socket.socket, str]:
    path = os.path.join(tmp, "launcher.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    return sock, path


async def _servers(address: str) -> str:
    rc, out, err = await gdbus_call(address, MANAGER, f"{IFACE}.ListServers")
    assert rc == 0, err
    return out


async def test_add_server_again_with_the_same_socket_is_the_same_server(
    service_factory: Any, manager_bus: MessageBus, bus: PrivateBus, tmp_path: str
) -> None:
    old = service_factory()
    sock, path = _listening(str(tmp_path))
    named = {LISTEN_FD: Variant("h", 0), "StopOnDisconnect": Variant("b", False)}
    first, _ = await add_server(manager_bus, app_id="org.example.Launched", named=named,
                                unix_fds=[sock.fileno()])
    bystander, by_res = await add_server(manager_bus, app_id="org.example.Bystander")
    again, _ = await add_server(manager_bus, app_id="org.example.Launched", named=named,
                                unix_fds=[sock.fileno()])
    assert again == first
    # Another instance may not take (or share) a socket that is served.
    reply = await add_server_reply(manager_bus, app_id="org.example.Hijack", named=named,
                                   unix_fds=[sock.fileno()])
    assert reply.message_type == MessageType.ERROR
    assert reply.error_name == "org.freedesktop.DBus.Error.InvalidArgs"
    assert first in str(reply.body[0]) and "org.example.Launched" in str(reply.body[0])
    out = await _servers(bus.address)
    assert out.count("/c") == 2, out
    with RawConn(f"unix:path={path}").setup() as conn:
        assert conn.unique_name
    with RawConn(by_res["Address"].value).setup() as conn:  # the bystander is unharmed
        assert conn.unique_name

    # After serve --replace the new process answers the same way.
    new = service_factory("--replace")
    assert old.process.wait(20) == 0  # it had no connection left to forward
    again, _ = await add_server(manager_bus, app_id="org.example.Launched", named=named,
                                unix_fds=[sock.fileno()])
    assert again == first
    out = await _servers(bus.address)
    assert out.count("/c") == 2 and bystander in out, out + new.log()
    with RawConn(f"unix:path={path}").setup() as conn:
        assert conn.unique_name
    sock.close()


async def test_a_registration_from_another_connection_moves_stop_on_disconnect(
    service: Any, bus: PrivateBus, tmp_path: str
) -> None:
    """The launcher registers again from a new connection (its old one went with the
    service): the server follows the new one for StopOnDisconnect, not the old."""
    sock, _path = _listening(str(tmp_path))
    named = {LISTEN_FD: Variant("h", 0)}  # StopOnDisconnect: the default, true
    old_conn = await MessageBus(bus_address=bus.address, negotiate_unix_fd=True).connect()
    new_conn = await MessageBus(bus_address=bus.address, negotiate_unix_fd=True).connect()
    first, _ = await add_server(old_conn, app_id="org.example.Moved", named=named,
                                unix_fds=[sock.fileno()])
    again, _ = await add_server(new_conn, app_id="org.example.Moved", named=named,
                                unix_fds=[sock.fileno()])
    assert again == first
    old_conn.disconnect()
    await old_conn.wait_for_disconnect()
    rc, out, err = await gdbus_call(bus.address, first,
                                    "org.freedesktop.DBus.Properties.Get",
                                    f"{IFACE}.Server", "Listening")
    assert rc == 0 and "true" in out, err + out
    new_conn.disconnect()
    await new_conn.wait_for_disconnect()
    for _ in range(100):
        rc, out, _err = await gdbus_call(bus.address, MANAGER, f"{IFACE}.ListServers")
        if first not in out:
            break
        await asyncio.sleep(0.05)
    assert first not in out
    sock.close()
