"""When the bus drops a client's connection, the client still gets what was queued, then EOF."""

from __future__ import annotations

import socket
import time

from tests.conftest import ServiceProcess, add_server, call, ok
from tests.support.rawconn import RawConn
from tests.support.wire import driver_call, method_call


async def test_client_is_closed_after_the_flush_when_its_bus_connection_ends(
    service: ServiceProcess, manager_bus
):  # type: ignore[no-untyped-def]
    _path, res = await add_server(manager_bus, app_id="org.example.Slow")
    conn = RawConn(res["Address"].value).setup()
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # Many replies the client does not read yet: the proxy cannot write them all at once.
    for _ in range(3000):
        conn.send(driver_call(conn.next_serial(), "ListNames"))
    # Then something that makes the bus drop this connection (and only this one).
    conn.send(
        method_call(
            conn.next_serial(),
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus/Local",
            "org.freedesktop.DBus.Local",
            "Disconnected",
        )
    )
    time.sleep(0.5)
    conn.sock.settimeout(1.0)
    deadline = time.monotonic() + 15
    received = 0
    while time.monotonic() < deadline:
        try:
            chunk = conn.sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        received += len(chunk)
    else:
        raise AssertionError("the proxy kept the client open after its bus connection ended")
    assert received > 300_000  # what was queued was delivered before the close
    conn.sock.close()
    # The service and its other users carry on.
    assert service.process.poll() is None
    ok(await call(manager_bus, "ListServers"))
