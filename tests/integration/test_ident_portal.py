"""Portal interop: a portal identifies its callers the way xdg-desktop-portal's Containers1
branch (flatpak/xdg-desktop-portal PR 1268) does, through this service.

The "portal" is a dbus-python service (``dbus.service.Object``) on the real bus, driven by
GLib (``DBusGMainLoop``), so these tests run on asyncio-glib's loop (``@pytest.mark.glib``).
For each incoming call it asks, asynchronously (reply_handler / error_handler):

1. ``GetConnectionInfo(sender)``: a confined caller -> container type, app id, instance id
   and the metadata the launcher set (``DesktopFile``, ``NetworkAccess``); NotContainer ->
   the caller is a host app;
2. for a confined caller, ``GetConnectionCredentials(sender)`` and its ``ProcessFD``: the
   race-free pidfd of the real client process, which an xdg-dbus-proxy setup cannot give
   (PR 1268: "the xdg-dbus-proxy also means we can't use the pidfd"). A host caller's pid
   comes from the bus.

GLib callbacks hand results to asyncio with ``loop.call_soon_threadsafe`` (asyncio-glib
notices plain ``set_result`` calls from GLib callbacks only seconds later).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus

from tests.conftest import IFACE, NAME, PATH, ServiceProcess, add_server, call, connect, ok
from tests.support.bus import PrivateBus
from tests.support.names import FILTER, POLICY
from tests.support.processes import fdinfo_pid

pytestmark = [pytest.mark.glib, pytest.mark.timeout(60)]

PORTAL_NAME = "org.example.IdentPortal"
PORTAL_PATH = "/org/example/IdentPortal"
PORTAL_IFACE = "org.example.IdentPortal"
NOT_CONTAINER = "org.freedesktop.DBus.Error.NotContainer"


@dataclass
class AppInfo:
    """What the portal concluded about one caller."""

    sender: str
    kind: str  # "host" or the container type
    app_id: str = ""
    instance_id: str = ""
    desktop_file: str = ""
    network: bool = True  # host apps have the network
    server: str = ""
    pid: int = 0
    pid_from_pidfd: bool = False
    errors: list[str] = field(default_factory=list)


class Portal:
    """The dbus-python portal; ``identified`` collects an AppInfo per handled call."""

    def __init__(self, address: str, loop: asyncio.AbstractEventLoop) -> None:
        """Connect to the bus at ``address`` with the GLib main loop; export and own the name."""
        import dbus
        import dbus.bus
        import dbus.service
        from dbus.mainloop.glib import DBusGMainLoop

        self.loop = loop
        self.conn = dbus.bus.BusConnection(address, mainloop=DBusGMainLoop())
        self.identified: list[AppInfo] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        portal = self

        class PortalObject(dbus.service.Object):  # type: ignore[misc]
            @dbus.service.method(  # type: ignore[misc]
                PORTAL_IFACE,
                in_signature="s",
                out_signature="a{sv}",
                sender_keyword="sender",
                async_callbacks=("reply_cb", "error_cb"),
            )
            def Request(self, what: str, sender: str, reply_cb: Any, error_cb: Any) -> None:
                portal._identify(str(sender), str(what), reply_cb, error_cb)

        self.obj = PortalObject(self.conn, PORTAL_PATH)
        self.bus_name = dbus.service.BusName(PORTAL_NAME, self.conn, do_not_queue=True)

    # -- identification, all in GLib callbacks ---------------------------------------------

    def _identify(self, sender: str, what: str, reply_cb: Any, error_cb: Any) -> None:
        def on_info(
            server: str, _creator: Any, ctype: str, app_id: str, instance_id: str, md: Any
        ) -> None:
            info = AppInfo(
                sender=sender,
                kind=str(ctype),
                app_id=str(app_id),
                instance_id=str(instance_id),
                desktop_file=str(md.get("DesktopFile", "")),
                # The launcher says whether the app has the network; unset means no.
                network=bool(md.get("NetworkAccess", False)),
                server=str(server),
            )
            self._credentials(info, what, reply_cb, error_cb)

        def on_info_error(exc: Any) -> None:
            if exc.get_dbus_name() != NOT_CONTAINER:
                # Anything else is a failure to identify: refuse, as the portal does.
                error_cb(exc)
                self._record(AppInfo(sender=sender, kind="error", errors=[exc.get_dbus_name()]))
                return
            info = AppInfo(sender=sender, kind="host")
            self.conn.call_async(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "GetConnectionUnixProcessID",
                "s",
                (sender,),
                reply_handler=lambda pid: self._finish(info, int(pid), False, what, reply_cb),
                error_handler=error_cb,
            )

        self.conn.call_async(
            NAME,
            PATH,
            IFACE,
            "GetConnectionInfo",
            "s",
            (sender,),
            reply_handler=on_info,
            error_handler=on_info_error,
        )

    def _credentials(self, info: AppInfo, what: str, reply_cb: Any, error_cb: Any) -> None:
        def on_creds(creds: Any) -> None:
            pid = int(creds["ProcessID"])
            from_pidfd = False
            if "ProcessFD" in creds:
                fd = creds["ProcessFD"].take()
                try:
                    pidfd_pid = fdinfo_pid(fd)
                finally:
                    os.close(fd)
                if pidfd_pid != pid:
                    info.errors.append(f"pidfd says {pidfd_pid}, ProcessID {pid}")
                pid, from_pidfd = pidfd_pid, True
            if str(creds.get("org.freedesktop.DBus.Containers1.Path", "")) != info.server:
                info.errors.append("credentials name another server")
            self._finish(info, pid, from_pidfd, what, reply_cb)

        self.conn.call_async(
            NAME,
            PATH,
            IFACE,
            "GetConnectionCredentials",
            "s",
            (info.sender,),
            reply_handler=on_creds,
            error_handler=error_cb,
        )

    def _finish(self, info: AppInfo, pid: int, from_pidfd: bool, what: str, reply_cb: Any) -> None:
        import dbus

        info.pid = pid
        info.pid_from_pidfd = from_pidfd
        reply_cb(
            dbus.Dictionary(
                {
                    "kind": dbus.String(info.kind),
                    "app_id": dbus.String(info.app_id),
                    "desktop_file": dbus.String(info.desktop_file),
                    "network": dbus.Boolean(info.network),
                    "pid": dbus.UInt32(pid),
                    "request": dbus.String(what),
                },
                signature="sv",
            )
        )
        self._record(info)

    def _record(self, info: AppInfo) -> None:
        # Called from a GLib callback: hand over to asyncio thread-safely.
        self.loop.call_soon_threadsafe(self._recorded, info)

    def _recorded(self, info: AppInfo) -> None:
        self.identified.append(info)
        for predicate, fut in list(self._waiters):
            if not fut.done() and predicate():
                fut.set_result(None)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds over ``identified``."""
        if predicate():
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.remove(entry)

    def info_for(self, sender: str) -> AppInfo:
        """The one AppInfo recorded for ``sender``."""
        found = [i for i in self.identified if i.sender == sender]
        assert len(found) == 1, (sender, self.identified)
        return found[0]

    def close(self) -> None:
        """Leave the bus."""
        self.obj.remove_from_connection()
        # BusName releases the name when collected: let it, while the connection is open.
        del self.bus_name
        self.conn.close()


@pytest.fixture
async def portal(bus: PrivateBus) -> AsyncIterator[Portal]:
    """The portal on the real bus, on the running (GLib) loop."""
    p = Portal(bus.address, asyncio.get_running_loop())
    yield p
    p.close()


async def request(client: MessageBus, what: str = "open") -> Message:
    """Call the portal."""
    return await call(
        client,
        "Request",
        "s",
        [what],
        destination=PORTAL_NAME,
        path=PORTAL_PATH,
        interface=PORTAL_IFACE,
    )


def flatpak_like() -> dict[str, Variant]:
    """A filtered server where the portal is talk, as flatpak sets up its session bus."""
    return {
        FILTER: Variant("b", True),
        POLICY: Variant("a{ss}", {PORTAL_NAME: "talk"}),
    }



async def add_flatpak_app(
    manager: MessageBus, app_id: str, instance: str, desktop_file: str, network: bool
) -> tuple[str, dict[str, Variant]]:
    """AddServer as flatpak would (``flatpak_like``), with the metadata the portal reads."""
    metadata = {
        "DesktopFile": Variant("s", desktop_file),
        "NetworkAccess": Variant("b", network),
    }
    return await add_server(
        manager, "org.flatpak", app_id, instance, metadata=metadata, named=flatpak_like()
    )

# -- the portal tells a confined app from a host app --------------------------------------


async def test_portal_identifies_confined_and_host_callers(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus, portal: Portal
) -> None:
    loop = asyncio.get_running_loop()
    assert loop.__class__.__name__ == "GLibEventLoop", "this test must run on asyncio-glib"
    path, results = await add_flatpak_app(
        manager_bus, "org.example.Photos", "1234", "org.example.Photos.desktop", network=False
    )
    confined = await connect(results["Address"].value)
    host = await connect(bus.address)
    try:
        # Both at once: the portal handles them concurrently, each on its own reply chain.
        confined_reply, host_reply = await asyncio.gather(
            request(confined, "screenshot"), request(host, "screenshot")
        )
        got = ok(confined_reply)[0]
        assert {k: v.value for k, v in got.items()} == {
            "kind": "org.flatpak",
            "app_id": "org.example.Photos",
            "desktop_file": "org.example.Photos.desktop",
            "network": False,
            "pid": os.getpid(),
            "request": "screenshot",
        }
        got = ok(host_reply)[0]
        assert got["kind"].value == "host"
        assert got["app_id"].value == ""
        assert got["network"].value is True
        assert got["pid"].value == os.getpid()

        await portal.wait_for(lambda: len(portal.identified) == 2)
        app = portal.info_for(confined.unique_name)
        assert app.kind == "org.flatpak" and app.app_id == "org.example.Photos"
        assert app.instance_id == "1234"
        assert app.server == path
        assert app.pid_from_pidfd, "the portal should have got a pidfd through the service"
        assert app.errors == []
        host_info = portal.info_for(host.unique_name)
        assert host_info.kind == "host" and not host_info.pid_from_pidfd
    finally:
        confined.disconnect()
        host.disconnect()


#: A confined app in its own process: dbus-python, blocking, calls the portal and prints
#: the portal's answer, then waits for stdin to close (so the test can check its pidfd).
_APP = r"""
import sys
import dbus.bus
conn = dbus.bus.BusConnection(sys.argv[1])
reply = conn.call_blocking(sys.argv[2], sys.argv[3], sys.argv[4], "Request", "s", ("share",),
                           timeout=10)
print(conn.get_unique_name(), reply["kind"], reply["app_id"], reply["desktop_file"],
      int(bool(reply["network"])), int(reply["pid"]), flush=True)
sys.stdin.read()
"""


async def test_portal_gets_the_pidfd_of_a_confined_app_process(
    service: ServiceProcess, manager_bus: MessageBus, portal: Portal
) -> None:
    _path, results = await add_flatpak_app(
        manager_bus, "org.example.Chat", "77", "org.example.Chat.desktop", network=True
    )
    app = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _APP,
            results["Address"].value,
            PORTAL_NAME,
            PORTAL_PATH,
            PORTAL_IFACE,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert app.stdout is not None
        # The portal serves on this loop while a thread waits for the app's line.
        line = await asyncio.wait_for(asyncio.to_thread(app.stdout.readline), 15)
        assert line, app.stderr.read() if app.stderr else ""
        name, kind, app_id, desktop, network, pid = line.split()
        assert (kind, app_id, desktop, network) == (
            "org.flatpak",
            "org.example.Chat",
            "org.example.Chat.desktop",
            "1",
        )
        # The pid the portal acted on came from the pidfd and names the app process,
        # not the service that proxies it nor the launcher.
        assert int(pid) == app.pid
        await portal.wait_for(lambda: any(i.sender == name for i in portal.identified))
        info = portal.info_for(name)
        assert info.pid == app.pid and info.pid_from_pidfd
        assert info.pid != service.process.pid and info.pid != os.getpid()
        assert info.errors == []
    finally:
        if app.stdin is not None:
            app.stdin.close()
        try:
            await asyncio.to_thread(app.wait, 10)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait()
        for stream in (app.stdout, app.stderr):
            if stream is not None:
                stream.close()


async def test_portal_keeps_apps_apart(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus, portal: Portal
) -> None:
    """Two instances of different apps, one without metadata (NetworkAccess unset means no
    network, DesktopFile unset means empty); a stopped-listening server still identifies its
    live connection."""
    p1, r1 = await add_flatpak_app(manager_bus, "org.example.One", "a", "one.desktop", True)
    p2, r2 = await add_server(
        manager_bus,
        "io.snapcraft",
        "two",
        "b",
        named=flatpak_like(),
    )
    one = await connect(r1["Address"].value)
    two = await connect(r2["Address"].value)
    try:
        ok(await call(manager_bus, "StopListening", "o", [p1]))
        replies = await asyncio.gather(*(request(c) for c in (one, two, one, two)))
        vals = [{k: v.value for k, v in ok(r)[0].items()} for r in replies]
        seen = [(v["kind"], v["app_id"], v["desktop_file"], v["network"]) for v in vals]
        one_info = ("org.flatpak", "org.example.One", "one.desktop", True)
        assert seen == [one_info, ("io.snapcraft", "two", "", False)] * 2
        await portal.wait_for(lambda: len(portal.identified) == 4)
        assert {i.server for i in portal.identified} == {p1, p2}
        assert all(i.pid_from_pidfd and not i.errors for i in portal.identified)
    finally:
        one.disconnect()
        two.disconnect()
