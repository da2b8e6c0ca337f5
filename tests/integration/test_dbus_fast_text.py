"""Non-ASCII text on every supported dbus-fast. Where the release marshals it right
(>= 2.12) it round-trips; before that (Debian 12's 1.84.2 writes string lengths in
characters) the service answers Failed saying so, escapes error texts, and keeps serving,
instead of sending a malformed message the bus would disconnect it for. The text comes
from gdbus, a client whose marshaller we did not write."""

from __future__ import annotations

import subprocess

from tests.conftest import NAME, PATH, ServiceProcess, call, ok
from tests.support.packages import ensure_packages
from xdg_containers.compat import dbusfast

IFACE = "org.freedesktop.DBus.Containers1"


def _gdbus(address: str, method: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["gdbus", "call", "--address", address, "-d", NAME, "-o", PATH, "-m",
         f"{IFACE}.{method}", *args],
        capture_output=True, text=True, timeout=20,
    )


async def test_non_ascii_replies_and_error_texts(service: ServiceProcess, manager_bus):  # type: ignore[no-untyped-def]
    ensure_packages("libglib2.0-bin")
    address = service.bus_address
    added = _gdbus(address, "AddServer", "org.example.T", "app", "inst",
                   "{'k': <'caf\u00e9'>}", "{'StopOnDisconnect': <false>}")
    assert added.returncode == 0, added.stderr
    path = added.stdout.split("'")[1]
    info = _gdbus(address, "GetServerInfo", f"objectpath '{path}'")
    bad = _gdbus(address, "AddServer", "caf\u00e9 type", "app", "inst", "@a{sv} {}",
                 "@a{sv} {}")
    assert "InvalidArgs" in bad.stderr, bad.stderr
    if dbusfast.text_ok():
        assert info.returncode == 0 and "caf\u00e9" in info.stdout, info
        assert "caf\u00e9 type" in bad.stderr, bad.stderr
    else:
        assert "org.freedesktop.DBus.Error.Failed" in info.stderr, info
        assert "non-ASCII text" in info.stderr and "dbus-fast 2.12" in info.stderr, info
        assert "caf\\xe9 type" in bad.stderr, bad.stderr
        assert "non-ASCII text in replies and signals is off" in service.log()
    # Still serving, on the same bus connection.
    assert path in ok(await call(manager_bus, "ListServers"))[0]
    ok(await call(manager_bus, "StopServer", "o", [path]))
