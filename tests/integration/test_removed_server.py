"""Per-server methods on a removed (or never created) server answer NotContainer naming the
path (SPEC: "Unknown or already removed path: NotContainer"), asked by clients we did not
write: dbus-send and gdbus."""

from __future__ import annotations

import asyncio
import subprocess

from tests.conftest import ServiceProcess, add_server, call, ok
from tests.support.packages import ensure_packages

NAME = "org.freedesktop.DBus.Containers1"
SERVER = "org.freedesktop.DBus.Containers1.Server"
NOT_CONTAINER = "org.freedesktop.DBus.Error.NotContainer"


def _dbus_send(
    address: str, path: str, method: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dbus-send", f"--bus={address}", "--print-reply", f"--dest={NAME}", path,
         f"{SERVER}.{method}", *args],
        capture_output=True, text=True, timeout=20,
    )


def _gdbus(address: str, path: str, method: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["gdbus", "call", "--address", address, "-d", NAME, "-o", path, "-m", method, *args],
        capture_output=True, text=True, timeout=20,
    )


async def test_stop_on_a_removed_server_is_not_container(service: ServiceProcess, manager_bus):  # type: ignore[no-untyped-def]
    ensure_packages("dbus-bin", "libglib2.0-bin")
    path, _ = await add_server(manager_bus, named={})
    address = service.bus_address
    ok(await call(manager_bus, "StopServer", "o", [path]))

    for _ in range(100):  # removal follows the last connection's end, at once here
        if path not in ok(await call(manager_bus, "ListServers"))[0]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"{path} still listed after StopServer")
    for method in ("Stop", "StopListening"):
        done = _dbus_send(address, path, method)
        assert done.returncode != 0, done.stdout
        assert f"Error {NOT_CONTAINER}: {path} is not a live container server" in done.stderr, (
            done.stderr)
    for method, args in ((f"{SERVER}.Stop", ()), (f"{SERVER}.StopListening", ()),
                         (f"{SERVER}.SetPolicy", ("@a{sv} {}",))):
        done = _gdbus(address, path, method, *args)
        assert done.returncode != 0, done.stdout
        assert NOT_CONTAINER in done.stderr and path in done.stderr, (method, done.stderr)
    # The object is gone: reading its properties is UnknownObject (docs/interface.md).
    done = _gdbus(address, path, "org.freedesktop.DBus.Properties.GetAll", SERVER)
    assert "org.freedesktop.DBus.Error.UnknownObject" in done.stderr, done.stderr
    never = path.rsplit("c", 1)[0] + "c999"
    done = _gdbus(address, never, f"{SERVER}.Stop")
    assert NOT_CONTAINER in done.stderr and never in done.stderr, done.stderr
    # A path that is not a server's keeps the usual answer.
    done = _gdbus(address, "/org/example/Nothing", f"{SERVER}.Stop")
    assert "org.freedesktop.DBus.Error.Unknown" in done.stderr, done.stderr
