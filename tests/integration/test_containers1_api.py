"""The manager interface beyond upstream's cases: ordering of ServerRemoved, error names and
messages, GetConnectionInfo corner cases, creator credentials, StopOnDisconnect, ListenFD
and the Bus named argument (SPEC §2, §3, §5)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from dbus_fast.constants import RequestNameReply

from tests.conftest import (
    ServiceProcess,
    add_server,
    add_server_reply,
    call,
    confined_client,
    connect,
    error,
    ok,
)
from tests.integration import helpers_c1 as c1
from tests.integration.helpers_c1 import Observer, driver_call, list_servers, socket_path_of
from tests.support.bus import PrivateBus
from tests.support.names import BUS_ARG, DRIVER, POLICY, PROPS, SERVER_IFACE

pytestmark = pytest.mark.timeout(30)


LISTEN_FD = "org.freedesktop.XdgContainers1.ListenFD"


def token(text: str, word: str) -> bool:
    """``word`` appears in ``text`` as a whole token (type signatures in messages)."""
    return re.search(rf"(?<![\w{{}}]){re.escape(word)}(?![\w{{}}])", text) is not None


# -- ServerRemoved: once, and before the reply of the stop call that removes it ----------------


@pytest.mark.parametrize(
    "stop, connected",
    [("StopListening", False), ("StopServer", False), ("StopServer", True)],
    ids=["StopListening-unused", "StopServer-unused", "StopServer-connected"],
)
async def test_server_removed_precedes_stop_reply(
    service: ServiceProcess, manager_bus: MessageBus, stop: str, connected: bool
) -> None:
    rec = await Observer(manager_bus).start()
    other, _ = await add_server(manager_bus, instance_id="other")
    path, results = await add_server(manager_bus)
    confined = await connect(results["Address"].value) if connected else None
    try:
        reply = await call(manager_bus, stop, "o", [path])
        ok(reply)
        kinds = [(e.kind, e.args[0]) for e in rec.events if e.kind in ("removed", "reply")]
        assert ("removed", path) in kinds, f"no ServerRemoved before the {stop} reply: {kinds}"
        assert kinds.index(("removed", path)) < kinds.index(("reply", reply.reply_serial))
        if confined is not None:
            await c1.wait_disconnected(confined)
        await rec.sync()
        assert rec.removed() == [path], "exactly one ServerRemoved, and only for the stopped server"
        signal = next(e for e in rec.events if e.kind == "removed")
        owner = ok(
            await driver_call(
                manager_bus, "GetNameOwner", "s", ["org.freedesktop.DBus.Containers1"]
            )
        )[0]
        assert signal.sender == owner
        # Stopping it again: it is gone, and nothing more is emitted.
        error(await call(manager_bus, "StopServer", "o", [path]), "NotContainer")
        error(await call(manager_bus, "StopListening", "o", [path]), "NotContainer")
        await rec.sync()
        assert rec.removed() == [path]
        assert await list_servers(manager_bus) == [other]
    finally:
        if confined is not None:
            confined.disconnect()


async def test_server_removed_once_when_last_connection_leaves(
    service: ServiceProcess, manager_bus: MessageBus, observer: Observer
) -> None:
    path, results = await add_server(manager_bus)
    a = await connect(results["Address"].value)
    b = await connect(results["Address"].value)
    try:
        ok(await call(manager_bus, "StopListening", "o", [path]))
        # Again while connections remain: a no-op success.
        ok(await call(manager_bus, "StopListening", "o", [path]))
        a.disconnect()
        await observer.wait_name_gone(a.unique_name)
        await observer.sync()
        assert observer.removed() == []
        b.disconnect()
        await observer.wait_removed(path)
        await observer.sync()
        assert observer.removed() == [path]
    finally:
        a.disconnect()
        b.disconnect()


async def test_stop_unknown_paths(service: ServiceProcess, manager_bus: MessageBus) -> None:
    for member in ("StopServer", "StopListening"):
        for p in (
            "/org/freedesktop/DBus/Containers1/c42",
            "/",
            "/org/freedesktop/DBus/Containers1",
        ):
            error(await call(manager_bus, member, "o", [p]), "NotContainer")


# -- argument errors ----------------------------------------------------------------------


async def test_unknown_named_argument_is_named(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    reply = await call(
        manager_bus,
        "AddServer",
        "sssa{sv}a{sv}",
        ["org.example.Test", "app", "", {}, {"com.example.NoSuchArgument": Variant("b", True)}],
    )
    text = error(reply, "InvalidArgs")
    assert "com.example.NoSuchArgument" in text, text
    assert await list_servers(manager_bus) == []


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("StopOnDisconnect", Variant("x", 1), "b"),
        ("StopOnNotify", Variant("s", "3"), "h"),
        ("org.freedesktop.XdgContainers1.Policy", Variant("a{sv}", {}), "a{ss}"),
        ("org.freedesktop.XdgContainers1.Bus", Variant("ay", b"session"), "s"),
    ],
)
async def test_wrong_named_argument_type_names_both_types(
    service: ServiceProcess, manager_bus: MessageBus, key: str, value: Variant, expected: str
) -> None:
    named = {key: value}
    if "Policy" in key:
        named["org.freedesktop.XdgContainers1.Filter"] = Variant("b", True)
    reply = await call(
        manager_bus, "AddServer", "sssa{sv}a{sv}", ["org.example.Test", "app", "", {}, named]
    )
    text = error(reply, "InvalidArgs")
    assert key in text, text
    assert token(text, expected), f"expected type {expected!r} not named: {text}"
    assert token(text, value.signature), f"actual type {value.signature!r} not named: {text}"
    assert await list_servers(manager_bus) == []


async def test_policy_without_filter_is_invalid(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    policy = {POLICY: Variant("a{ss}", {"org.example.Foo": "talk"})}
    reply = await add_server_reply(manager_bus, "org.example.Test", "app", "", named=policy)
    text = error(reply, "InvalidArgs")
    assert "Filter" in text, text
    assert await list_servers(manager_bus) == []


@pytest.mark.parametrize(
    "member, signature, body",
    [
        ("AddServer", "sss", ["org.example.Test", "a", "i"]),
        ("AddServer", "sssa{sv}", ["org.example.Test", "a", "i", {}]),
        ("AddServer", "sssa{ss}a{sv}", ["org.example.Test", "a", "i", {}, {}]),
        ("StopServer", "s", ["/org/freedesktop/DBus/Containers1/c0"]),
        ("StopListening", "", []),
        ("GetConnectionInfo", "u", [1]),
        ("GetServerInfo", "s", ["/org/freedesktop/DBus/Containers1/c0"]),
        ("GetConnectionCredentials", "", []),
        ("ListServers", "s", ["x"]),
    ],
)
async def test_wrong_method_signature_is_invalid_args(
    service: ServiceProcess,
    manager_bus: MessageBus,
    member: str,
    signature: str,
    body: list[object],
) -> None:
    text = error(await call(manager_bus, member, signature, body), "InvalidArgs")
    assert member in text, text
    assert await list_servers(manager_bus) == []


# -- GetConnectionInfo -------------------------------------------------------------------


@pytest.mark.parametrize("member", ["GetConnectionInfo", "GetConnectionCredentials"])
async def test_identify_errors(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus, member: str
) -> None:
    other = await connect(bus.address)
    try:
        assert await other.request_name("org.example.Unconfined") == RequestNameReply.PRIMARY_OWNER
        error(await call(manager_bus, member, "s", [DRIVER]), "NotContainer")
        error(await call(manager_bus, member, "s", [manager_bus.unique_name]), "NotContainer")
        error(await call(manager_bus, member, "s", [other.unique_name]), "NotContainer")
        error(await call(manager_bus, member, "s", ["org.example.Unconfined"]), "NotContainer")
        error(
            await call(manager_bus, member, "s", ["org.freedesktop.DBus.Containers1"]),
            "NotContainer",
        )
        for name in (
            "com.example.Nobody",
            ":1.99999",
            "not a bus name",
            "",
            ".",
            ":",
            "org..x",
            "x" * 300,
        ):
            error(await call(manager_bus, member, "s", [name]), "NameHasNoOwner")
    finally:
        other.disconnect()


async def test_connection_info_by_well_known_name(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    async with confined_client(manager_bus, "org.example.Test", "org.example.App", "inst") as (
        path,
        _,
        confined,
    ):
        assert (
            await confined.request_name("org.example.ConfinedApp") == RequestNameReply.PRIMARY_OWNER
        )
        info = ok(await call(manager_bus, "GetConnectionInfo", "s", ["org.example.ConfinedApp"]))
        assert info[0] == path
        assert info[2:5] == ["org.example.Test", "org.example.App", "inst"]
        reply = await call(
            manager_bus, "GetConnectionCredentials", "s", ["org.example.ConfinedApp"]
        )
        c1.close_fds(reply)
        creds = ok(reply)[0]
        assert creds["org.freedesktop.DBus.Containers1.Path"].value == path
        assert creds["UnixUserID"].value == os.getuid()
        assert creds["ProcessID"].value == os.getpid()


async def test_connection_info_after_stop_listening(
    service: ServiceProcess, manager_bus: MessageBus, observer: Observer
) -> None:
    path, results = await add_server(manager_bus, metadata={"k": Variant("s", "v")})
    confined = await connect(results["Address"].value)
    name = confined.unique_name
    try:
        ok(await call(manager_bus, "StopListening", "o", [path]))
        assert not os.path.exists(socket_path_of(results))
        info = ok(await call(manager_bus, "GetConnectionInfo", "s", [name]))
        assert info[0] == path and info[5]["k"].value == "v"
        assert ok(await call(manager_bus, "GetServerInfo", "o", [path]))[4]["k"].value == "v"
        # Confined callers may ask about themselves too.
        assert ok(await call(confined, "GetConnectionInfo", "s", [name]))[0] == path
    finally:
        confined.disconnect()
    await observer.wait_removed(path)
    await observer.wait_name_gone(name)
    error(await call(manager_bus, "GetConnectionInfo", "s", [name]), "NameHasNoOwner")


# -- creator credentials and StopOnDisconnect --------------------------------------------


async def test_creator_credentials_outlive_creator(
    service: ServiceProcess, bus: PrivateBus, observer: Observer
) -> None:
    creator = await connect(bus.address)
    creator_name = creator.unique_name
    path, results = await add_server(creator, named={"StopOnDisconnect": Variant("b", False)})
    confined = await connect(results["Address"].value)
    try:

        def check(c: dict[str, Variant]) -> None:
            assert c["UnixUserID"].signature == "u" and c["UnixUserID"].value == os.getuid()
            assert c["ProcessID"].signature == "u" and c["ProcessID"].value == os.getpid()

        check(ok(await call(observer.bus, "GetServerInfo", "o", [path]))[0])
        creator.disconnect()
        await observer.wait_name_gone(creator_name)
        await observer.sync()
        # Still listening (StopOnDisconnect false), and still answering.
        assert os.path.exists(socket_path_of(results))
        check(ok(await call(observer.bus, "GetServerInfo", "o", [path]))[0])
        check(ok(await call(observer.bus, "GetConnectionInfo", "s", [confined.unique_name]))[1])
        late = await connect(results["Address"].value)
        late.disconnect()
        assert path not in observer.removed()
        ok(await call(observer.bus, "StopServer", "o", [path]))
        await observer.wait_removed(path)
    finally:
        confined.disconnect()
        creator.disconnect()


async def test_stop_on_disconnect_defaults_to_true(
    service: ServiceProcess, bus: PrivateBus, observer: Observer
) -> None:
    creator = await connect(bus.address)
    creator_name = creator.unique_name
    used, used_results = await add_server(creator, instance_id="used")
    unused, unused_results = await add_server(creator, instance_id="unused")
    confined = await connect(used_results["Address"].value)
    try:
        creator.disconnect()
        await observer.wait_name_gone(creator_name)
        # The unused server goes at once; the used one stops listening but lives on.
        await observer.wait_removed(unused)
        await c1.wait_until(
            lambda: not os.path.exists(socket_path_of(used_results)), "used socket unlinked"
        )
        assert not os.path.exists(socket_path_of(unused_results))
        props = ok(
            await call(observer.bus, "GetAll", "s", [SERVER_IFACE], path=used, interface=PROPS)
        )[0]
        assert props["Listening"].value is False
        assert ok(await driver_call(confined, "GetNameOwner", "s", [DRIVER])) == [DRIVER]
        assert used not in observer.removed()
        confined.disconnect()
        await observer.wait_removed(used)
        await observer.sync()
        assert sorted(observer.removed()) == sorted([used, unused])
    finally:
        confined.disconnect()
        creator.disconnect()


# -- ListenFD ------------------------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="xdgc-listenfd-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def test_listen_fd(
    service: ServiceProcess, manager_bus: MessageBus, sock_dir: str, observer: Observer
) -> None:
    sock_path = os.path.join(sock_dir, "app-bus")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(8)
    try:
        path, results = await add_server(
            manager_bus, named={LISTEN_FD: Variant("h", 0)}, unix_fds=[listener.fileno()]
        )
    finally:
        listener.close()  # the service keeps its own copy
    assert "Address" not in results and "SocketPath" not in results
    assert service.sockets() == [], "no socket may be minted for a ListenFD server"
    confined = await connect(f"unix:path={sock_path}")
    try:
        info = ok(await call(manager_bus, "GetConnectionInfo", "s", [confined.unique_name]))
        assert info[0] == path
        assert ok(await driver_call(confined, "GetNameOwner", "s", [DRIVER])) == [DRIVER]
        ok(await call(manager_bus, "StopServer", "o", [path]))
        await c1.wait_disconnected(confined)
        await observer.wait_removed(path)
    finally:
        confined.disconnect()


@pytest.mark.parametrize("kind", ["not-listening", "datagram", "pipe", "tcp"])
async def test_listen_fd_must_be_listening_unix_stream(
    service: ServiceProcess, manager_bus: MessageBus, sock_dir: str, kind: str
) -> None:
    to_close: list[int] = []
    objs: list[socket.socket] = []
    if kind == "not-listening":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.path.join(sock_dir, "s"))
        objs.append(s)
        fd = s.fileno()
    elif kind == "datagram":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(os.path.join(sock_dir, "s"))
        objs.append(s)
        fd = s.fileno()
    elif kind == "tcp":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        objs.append(s)
        fd = s.fileno()
    else:
        r, w = os.pipe()
        to_close += [r, w]
        fd = r
    try:
        reply = await call(
            manager_bus,
            "AddServer",
            "sssa{sv}a{sv}",
            ["org.example.Test", "app", "", {}, {LISTEN_FD: Variant("h", 0)}],
            unix_fds=[fd],
        )
        text = error(reply, "InvalidArgs")
        assert "ListenFD" in text, text
        assert await list_servers(manager_bus) == []
    finally:
        for s in objs:
            s.close()
        for fd in to_close:
            os.close(fd)


# -- the Bus named argument ------------------------------------------------------------------


async def test_bus_argument_proxies_to_another_bus(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus, other_bus: PrivateBus
) -> None:
    second = other_bus
    direct: MessageBus | None = None
    confined: MessageBus | None = None
    try:
        direct = await connect(second.address)
        assert (
            await direct.request_name("org.example.OnlyOnSecondBus")
            == RequestNameReply.PRIMARY_OWNER
        )
        second_id = ok(await driver_call(direct, "GetId"))[0]
        first_id = ok(await driver_call(manager_bus, "GetId"))[0]
        assert second_id != first_id
        path, results = await add_server(
            manager_bus, named={"org.freedesktop.XdgContainers1.Bus": Variant("s", second.address)}
        )
        confined = await connect(results["Address"].value)
        assert ok(await driver_call(confined, "GetId"))[0] == second_id
        owner = ok(
            await driver_call(confined, "GetNameOwner", "s", ["org.example.OnlyOnSecondBus"])
        )[0]
        assert owner == direct.unique_name
        # The client's unique name is on the second bus; the second bus sees it.
        assert ok(await driver_call(direct, "NameHasOwner", "s", [confined.unique_name]))[0] is True
        pong = await call(
            confined,
            "Ping",
            destination=direct.unique_name,
            path="/",
            interface="org.freedesktop.DBus.Peer",
        )
        ok(pong)
        assert path in await list_servers(manager_bus)
    finally:
        if confined is not None:
            confined.disconnect()
        if direct is not None:
            direct.disconnect()


async def test_bus_argument_session_and_invalid(
    service: ServiceProcess, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    # "session" is the service's session bus: here, the test bus itself.
    session = {BUS_ARG: Variant("s", "session")}
    async with confined_client(manager_bus, named=session) as (_, _, confined):
        bus_id = ok(await driver_call(manager_bus, "GetId"))[0]
        assert ok(await driver_call(confined, "GetId"))[0] == bus_id
    for bad in ("not an address", "nosuchtransport:foo=bar", "unix:"):
        bus_arg = {BUS_ARG: Variant("s", bad)}
        reply = await add_server_reply(manager_bus, "org.example.Test", "app", "", named=bus_arg)
        text = error(reply, "InvalidArgs")
        assert "Bus" in text, text


# -- StopOnNotify: data counts as well as EOF ------------------------------------------------


async def test_stop_on_notify_data_stops_listening(
    service: ServiceProcess, manager_bus: MessageBus, observer: Observer
) -> None:
    r, w = os.pipe()
    try:
        path, results = await add_server(
            manager_bus, named={"StopOnNotify": Variant("h", 0)}, unix_fds=[r]
        )
        os.close(r)
        r = -1
        sock = socket_path_of(results)
        confined = await connect(results["Address"].value)
        try:
            assert os.path.exists(sock)
            os.write(w, b"x")  # readable, not closed
            await c1.wait_until(lambda: not os.path.exists(sock), "the socket to be unlinked")
            assert ok(await driver_call(confined, "GetNameOwner", "s", [DRIVER])) == [DRIVER]
            await observer.sync()
            assert path not in observer.removed()
        finally:
            confined.disconnect()
        await observer.wait_removed(path)
    finally:
        if r >= 0:
            os.close(r)
        os.close(w)


# -- identity details -------------------------------------------------------------------------


async def test_creator_is_what_the_bus_reported(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    path, _ = await add_server(manager_bus)
    from_bus = ok(
        await driver_call(manager_bus, "GetConnectionCredentials", "s", [manager_bus.unique_name])
    )[0]
    creator = ok(await call(manager_bus, "GetServerInfo", "o", [path]))[0]
    for key in ("UnixUserID", "ProcessID", "UnixGroupIDs", "LinuxSecurityLabel"):
        if key in from_bus:
            assert key in creator, f"creator lacks {key}"
            assert (creator[key].signature, creator[key].value) == (
                from_bus[key].signature,
                from_bus[key].value,
            )


async def test_paths_count_up_and_guids_are_per_server(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    first, r1 = await add_server(manager_bus)
    assert first == "/org/freedesktop/DBus/Containers1/c0"
    ok(await call(manager_bus, "StopServer", "o", [first]))
    second, r2 = await add_server(manager_bus)
    third, r3 = await add_server(manager_bus)
    assert (second, third) == (
        "/org/freedesktop/DBus/Containers1/c1",
        "/org/freedesktop/DBus/Containers1/c2",
    )
    guids = {re.search(r"guid=([0-9a-f]{32})", r["Address"].value).group(1) for r in (r1, r2, r3)}  # type: ignore[union-attr]
    bus_guid = re.search(r"guid=([0-9a-f]{32})", service.bus_address)
    assert len(guids) == 3
    if bus_guid:
        assert bus_guid.group(1) not in guids
    assert len({socket_path_of(r) for r in (r1, r2, r3)}) == 3
