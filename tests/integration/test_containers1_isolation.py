"""Who may use the service and who a connection is said to be (SPEC §1, §2, §3, §5).

- The uid a client claims in SASL must be its socket's uid.
- "never proxies with more privilege than the creator has": another uid must
  not obtain a server from us (whose upstream connections would carry *our*
  credentials).
- GetConnectionInfo answers about names on the *real* bus: a client proxied
  to another bus (the ``Bus`` named argument) must neither shadow nor hijack
  the identity of a real-bus connection that happens to have the same unique
  name (unique names are only unique per bus).
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from tests.conftest import IFACE, PATH, ServiceProcess, add_server, call, connect, error, ok
from tests.integration.helpers_c1 import Observer, list_servers, socket_path_of
from tests.support.bus import PrivateBus
from tests.support.commands import NOBODY, as_nobody_kwargs, gdbus_call, sasl_probe, stdlib_python
from tests.support.names import BUS_ARG

pytestmark = pytest.mark.timeout(30)




async def test_claimed_uid_must_match_socket_uid(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    _path, results = await add_server(manager_bus)
    sock = socket_path_of(results)
    assert (await asyncio.to_thread(sasl_probe, sock)).startswith(b"OK ")
    answer = await asyncio.to_thread(sasl_probe, sock, NOBODY)
    assert not answer.startswith(b"OK"), (
        f"a claim of uid {NOBODY} from uid {os.getuid()} was accepted"
    )
    assert answer in (b"", b"REJECTED EXTERNAL\r\n"), answer


# -- another uid on the same bus -------------------------------------------------------------


async def test_other_uid_cannot_add_server(
    service: ServiceProcess, bus: PrivateBus, manager_bus: MessageBus
) -> None:
    os.chmod(bus.tmpdir, 0o711)  # let uid 65534 reach the bus socket (itself 0777)
    rc, out, err = await gdbus_call(
        bus.address, PATH, f"{IFACE}.AddServer", "org.example.Intruder", "app", "", "{}", "{}",
        nobody=True,
    )
    # (If it got one, the service's SIGTERM at teardown removes the socket.)
    assert rc != 0, (
        f"uid {NOBODY} got a server from a service running as uid {os.getuid()}: {out.strip()}"
    )
    assert "org.freedesktop.DBus.Error.AccessDenied" in err, err
    assert await list_servers(manager_bus) == []


_LISTEN_FD_CHILD = r"""
import dbus, dbus.bus, json, os, socket, sys
out = {"uid": os.getuid()}
conn = dbus.bus.BusConnection(sys.argv[1])
mgr = conn.get_object("org.freedesktop.DBus.Containers1", "/org/freedesktop/DBus/Containers1")
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
name = "xdgc-c1-intruder-%d" % os.getpid()
listener.bind("\0" + name)
listener.listen(4)
try:
    path, results = mgr.AddServer(
        "org.example.Intruder", "app", "", dbus.Dictionary({}, signature="sv"),
        dbus.Dictionary({"org.freedesktop.XdgContainers1.ListenFD":
                         dbus.types.UnixFd(listener.fileno())}, signature="sv"),
        dbus_interface="org.freedesktop.DBus.Containers1", signature="sssa{sv}a{sv}")
    out["added"] = str(path)
    c = dbus.bus.BusConnection("unix:abstract=" + name)
    out["bus_sees_uid"] = int(c.call_blocking(
        "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
        "GetConnectionUnixUser", "s", (c.get_unique_name(),)))
    c.close()
    mgr.StopServer(path, dbus_interface="org.freedesktop.DBus.Containers1")
except dbus.exceptions.DBusException as e:
    out["error"] = e.get_dbus_name()
print(json.dumps(out))
"""


async def test_other_uid_cannot_reach_the_bus_with_our_credentials(
    service: ServiceProcess, bus: PrivateBus, manager_bus: MessageBus
) -> None:
    """uid 65534 hands in its own listening socket (ListenFD), connects to it, and must not
    end up on the bus authenticated as the service's uid."""
    os.chmod(bus.tmpdir, 0o711)
    proc = await asyncio.create_subprocess_exec(
        stdlib_python(),
        "-I",
        "-c",
        _LISTEN_FD_CHILD,
        bus.address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        **as_nobody_kwargs(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["uid"] == NOBODY
    seen = result.get("bus_sees_uid")
    assert seen in (None, NOBODY), (
        f"privilege escalation: uid {NOBODY} talks to the bus as uid {seen} "
        f"through {result.get('added')}"
    )
    assert "added" not in result, f"uid {NOBODY} was given server {result['added']}"
    assert result.get("error") == "org.freedesktop.DBus.Error.AccessDenied", result
    assert await list_servers(manager_bus) == []


# -- clients proxied to another bus ---------------------------------------------------------------


def _serial(unique_name: str) -> int:
    major, minor = unique_name[1:].split(".")
    assert major == "1", unique_name
    return int(minor)


async def _burn_names_until(address: str, target: str) -> None:
    """Connect and leave until the next connection to ``address`` will be called ``target``."""
    want = _serial(target)
    while True:
        c = await connect(address)
        n = _serial(c.unique_name)
        c.disconnect()
        assert n < want, f"{address} already handed out {c.unique_name}; cannot reach {target}"
        if n == want - 1:
            return


async def test_other_bus_client_does_not_shadow_real_bus_peer(
    service: ServiceProcess, manager_bus: MessageBus, observer: Observer, other_bus: PrivateBus
) -> None:
    second = other_bus
    confined: MessageBus | None = None
    try:
        path, results = await add_server(
            manager_bus,
            app_id="org.example.Elsewhere",
            named={BUS_ARG: Variant("s", second.address)},
        )
        await _burn_names_until(second.address, manager_bus.unique_name)
        confined = await connect(results["Address"].value)
        assert confined.unique_name == manager_bus.unique_name  # same string, different buses
        # The manager is an ordinary peer of the real bus...
        error(
            await call(observer.bus, "GetConnectionInfo", "s", [manager_bus.unique_name]),
            "NotContainer",
        )
        # ... and may still create and stop servers.
        other, _ = await add_server(manager_bus, instance_id="after")
        ok(await call(manager_bus, "StopServer", "o", [other]))
        ok(await call(manager_bus, "StopServer", "o", [path]))
    finally:
        if confined is not None:
            confined.disconnect()


async def test_other_bus_client_does_not_hijack_confined_identity(
    service: ServiceProcess, manager_bus: MessageBus, observer: Observer, other_bus: PrivateBus
) -> None:
    second = other_bus
    clients: list[MessageBus] = []
    try:
        main_path, main_results = await add_server(manager_bus, app_id="org.example.OnRealBus")
        _far_path, far_results = await add_server(
            manager_bus,
            app_id="org.example.Elsewhere",
            named={BUS_ARG: Variant("s", second.address)},
        )
        near = await connect(main_results["Address"].value)
        clients.append(near)
        await _burn_names_until(second.address, near.unique_name)
        far = await connect(far_results["Address"].value)
        clients.append(far)
        assert far.unique_name == near.unique_name

        async def identify() -> list[object]:
            return ok(await call(observer.bus, "GetConnectionInfo", "s", [near.unique_name]))

        info = await identify()
        assert (info[0], info[3]) == (main_path, "org.example.OnRealBus"), (
            f"{near.unique_name} on the real bus was identified as {info[3]} ({info[0]})"
        )
        # When the far client leaves, the real-bus app must not become "not a container".
        watcher = await Observer(await connect(second.address)).start()
        clients.append(watcher.bus)
        far_name = far.unique_name
        far.disconnect()
        await watcher.wait_name_gone(far_name)
        reply = await call(observer.bus, "GetConnectionInfo", "s", [near.unique_name])
        assert reply.message_type.name == "METHOD_RETURN", (
            f"confined {near.unique_name} now answers {reply.error_name}: a portal would treat it "
            "as an unconfined host app"
        )
        assert reply.body[0] == main_path
        error(
            await call(near, "AddServer", "sssa{sv}a{sv}", ["org.example.T", "a", "", {}, {}]),
            "AccessDenied",
        )
    finally:
        for c in clients:
            c.disconnect()
