"""ListenFD from a launcher written with dbus-python (libdbus), Wayland style."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

from tests.conftest import ServiceProcess, call, connect, ok

LAUNCHER = textwrap.dedent(
    """
    import json, socket, sys
    import dbus
    bus = dbus.bus.BusConnection(sys.argv[1])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sys.argv[2])
    listener.listen(8)
    manager = bus.get_object("org.freedesktop.DBus.Containers1",
                             "/org/freedesktop/DBus/Containers1")
    path, results = manager.AddServer(
        "org.example.Wayland", "org.example.App", "inst-7",
        dbus.Dictionary({"k": dbus.String("v")}, signature="sv"),
        dbus.Dictionary({
            "org.freedesktop.XdgContainers1.ListenFD": dbus.types.UnixFd(listener),
            "StopOnDisconnect": dbus.Boolean(False),
        }, signature="sv"),
        dbus_interface="org.freedesktop.DBus.Containers1")
    # The service has its own copy of the socket now; ours can go.
    listener.close()
    print(json.dumps({"path": str(path), "results": sorted(str(k) for k in results)}))
    sys.stdout.flush()
    """
)


async def test_dbus_python_launcher_hands_in_its_own_socket(
    service: ServiceProcess, manager_bus
):  # type: ignore[no-untyped-def]
    sock_dir = tempfile.mkdtemp(prefix="xdgc-wl-")
    sock_path = os.path.join(sock_dir, "app.sock")
    try:
        out = subprocess.run(
            [sys.executable, "-c", LAUNCHER, service.bus_address, sock_path],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
        launched = json.loads(out)
        # No Address or SocketPath for a socket the launcher made.
        assert launched["results"] == []
        path = launched["path"]
        assert service.sockets() == []  # nothing minted in the runtime dir
        client = await connect(f"unix:path={sock_path}")
        try:
            info = ok(await call(manager_bus, "GetConnectionInfo", "s", [client.unique_name]))
            assert info[0] == path
            assert info[2:5] == ["org.example.Wayland", "org.example.App", "inst-7"]
            assert info[5]["k"].value == "v"
        finally:
            client.disconnect()
        ok(await call(manager_bus, "StopServer", "o", [path]))
    finally:
        if os.path.exists(sock_path):
            os.unlink(sock_path)
        os.rmdir(sock_dir)
