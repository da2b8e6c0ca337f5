"""The real xdg-desktop-portal 1.16 sees a proxied flatpak app as that app (SPEC 10, issue 14).

xdg-desktop-portal identifies a caller by ``GetConnectionUnixProcessID`` and then
``/proc/PID/root/.flatpak-info``. Behind xdg-dbus-proxy that pid is the proxy's,
inside the app's sandbox; behind a shared service it must be the server's anchor,
never the service: ``NetworkMonitor.GetAvailable`` answers ``NotAllowed`` to an
org.flatpak app without network access and ``(true,)`` to the host.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from tests.conftest import ServiceProcess, add_server, call, ok
from tests.integration.test_cli_common import cli_argv, cli_env
from tests.support.bus import PrivateBus
from tests.support.packages import ensure_packages

pytestmark = pytest.mark.timeout(90)

PORTAL = "org.freedesktop.portal.Desktop"
PORTAL_PATH = "/org/freedesktop/portal/desktop"
NETWORK = "org.freedesktop.portal.NetworkMonitor"
GET_AVAILABLE = [
    "gdbus", "call", "--session", "--dest", PORTAL, "--object-path", PORTAL_PATH,
    "--method", f"{NETWORK}.GetAvailable",
]


@pytest.fixture
def real_portal(bus: PrivateBus, runtime_dir: str) -> Iterator[None]:
    """xdg-permission-store and xdg-desktop-portal on the test's private bus (no systemd)."""
    ensure_packages("xdg-desktop-portal")
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus.address, XDG_RUNTIME_DIR=runtime_dir)
    procs = []
    for prog in ("/usr/libexec/xdg-permission-store", "/usr/libexec/xdg-desktop-portal"):
        procs.append(subprocess.Popen([prog, "--replace"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
    try:
        for _ in range(100):  # until the portal answers the host
            r = subprocess.run(GET_AVAILABLE, env=env, capture_output=True, text=True,
                               check=False, timeout=10)
            if r.returncode == 0:
                break
            asyncio.run(asyncio.sleep(0.1))
        else:
            raise AssertionError(f"xdg-desktop-portal did not come up: {r.stderr}")
        yield
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)


async def _get_available(address: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=address)
    return await asyncio.to_thread(
        subprocess.run, GET_AVAILABLE, env=env, capture_output=True, text=True, timeout=20
    )


async def test_portal_sees_the_flatpak_app_not_the_host(
    service: ServiceProcess, manager_bus: MessageBus, real_portal: None, bus: PrivateBus
) -> None:
    """(d) NotAllowed for a proxied org.flatpak app (filtered or not), (true,) for the host."""
    host = await _get_available(bus.address)
    assert host.returncode == 0 and host.stdout.strip() == "(true,)", host
    for named in (
        {"StopOnDisconnect": Variant("b", False)},
        {
            "StopOnDisconnect": Variant("b", False),
            "org.freedesktop.XdgContainers1.Filter": Variant("b", True),
            "org.freedesktop.XdgContainers1.Policy": Variant("a{ss}", {PORTAL: "talk"}),
        },
    ):
        path, results = await add_server(
            manager_bus, "org.flatpak", "org.example.NoNet", "nn", named=named
        )
        app = await _get_available(results["Address"].value)
        assert app.returncode != 0, app
        assert "org.freedesktop.portal.Error.NotAllowed" in app.stderr, app.stderr
        assert "not available inside the sandbox" in app.stderr
        ok(await call(manager_bus, "StopServer", "o", [path]))
    # the host is still the host
    host = await _get_available(bus.address)
    assert host.stdout.strip() == "(true,)", host


async def test_portal_sees_an_app_launched_by_run_as_that_app(
    service: ServiceProcess, real_portal: None
) -> None:
    """``xdg-containers run``'s own anchor carries the identity the portal reads."""
    for sandbox in ([], ["--sandbox"]):
        r = await asyncio.to_thread(
            subprocess.run,
            cli_argv("run", "--type", "org.flatpak", "--app-id", "org.example.Run", *sandbox,
                     "--", *GET_AVAILABLE),
            env=cli_env(), capture_output=True, text=True, timeout=60,
        )
        assert r.returncode != 0, r
        assert "org.freedesktop.portal.Error.NotAllowed" in r.stderr, (sandbox, r.stderr)
