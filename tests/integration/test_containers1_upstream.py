"""dbus-daemon's ``test/containers.c`` (merge request 449), case by case, against our service.

Every upstream case keeps its name (``/containers/<name>`` -> ``test_<name>``)
and its meaning. Where upstream relies on dbus-daemon being the bus itself,
the equivalent through our service is used and the difference is said:

- upstream's "container path" header (``RequestHeader``) has no equivalent in
  a standalone service and is not in our SPEC; the signal part of
  ``basic`` checks that a confined connection's broadcasts reach others with
  its own unique name as sender, which is what the header test relied on;
- upstream asks the bus driver's ``GetConnectionCredentials`` for
  ``org.freedesktop.DBus.Containers1.Path``; here that is our own
  ``GetConnectionCredentials`` extension (SPEC §2), asked by the confined
  connection about itself;
- upstream's config files become ``--limit`` overrides (``LIMIT_CONTAINERS``,
  ``MAX_CONTAINERS``);
- upstream's TEST_USER_OTHER is uid 65534 (we run as root). Our sockets live in
  0700 directories, so another uid could not even reach them; the tests that
  need another uid give the directories o+x and the socket o+rw for the
  duration (``reachable_by_others``) so that the *service's* uid check is what
  refuses the connection, not the file system. Passing a connected fd to the
  child would not do: SO_PEERCRED is fixed at connect() time.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat

import pytest
from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus

from tests.conftest import (
    IFACE,
    PATH,
    ServiceProcess,
    add_server,
    add_server_reply,
    call,
    connect,
    error,
    ok,
)
from tests.integration import helpers_c1 as c1
from tests.integration.helpers_c1 import (
    LIMIT_CONTAINERS,
    MAX_CONTAINERS,
    SPEC_ARGUMENTS,
    Observer,
    driver_call,
    list_servers,
    socket_path_of,
)
from tests.support.bus import PrivateBus
from tests.support.commands import (
    NOBODY,
    connect_errno,
    gdbus_call,
    probe_as_nobody,
    reachable_by_others,
    sasl_probe,
)
from tests.support.names import DRIVER, PROPS, SERVER_IFACE

pytestmark = pytest.mark.timeout(30)


GONE = (2, 111)  # ENOENT, ECONNREFUSED: what connecting to a stopped server gives


def check_add_results(results: dict[str, Variant], runtime_dir: str) -> str:
    """What upstream's add_container_server() asserts about AddServer's results; the socket path."""
    address = results["Address"].value
    assert results["Address"].signature == "s"
    assert address.startswith("unix:")
    assert ";" not in address
    assert ":" not in address[len("unix:") :]
    assert results["SocketPath"].signature == "ay"
    path = socket_path_of(results)
    assert os.path.isabs(path)
    assert b"\0" not in results["SocketPath"].value[:-1]
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    # SPEC §2: a filesystem socket in $XDG_RUNTIME_DIR/dbus-1/containers, dirs 0700.
    containers = os.path.join(runtime_dir, "dbus-1", "containers")
    assert os.path.dirname(path) == containers
    for d in (containers, os.path.dirname(containers)):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    assert f"path={path}" in address.split(",") or f"unix:path={path}" in address.split(",")
    guid = [p for p in address.split(",") if p.startswith("guid=")]
    assert len(guid) == 1 and re.fullmatch(r"guid=[0-9a-f]{32}", guid[0]), address
    return path


async def assert_gdbus_stop_denied_for_other_uid(bus: PrivateBus, server_path: str) -> None:
    """upstream: a local attacker with another uid cannot stop our servers."""
    os.chmod(bus.tmpdir, 0o711)  # the bus socket itself is 0777, its dir 0700
    for member in ("StopListening", "StopServer"):
        rc, out, err = await gdbus_call(
            bus.address, PATH, f"{IFACE}.{member}",
            server_path,
            nobody=True,
        )
        assert rc != 0, f"uid {NOBODY} could {member} our server: {out}"
        assert "org.freedesktop.DBus.Error.AccessDenied" in err, err


# -- /containers/get-supported-arguments ------------------------------------------------------


async def test_get_supported_arguments(service: ServiceProcess, manager_bus: MessageBus) -> None:
    value = ok(
        await call(manager_bus, "Get", "ss", [IFACE, "SupportedArguments"], interface=PROPS)
    )[0]
    assert value.signature == "as"
    args = list(value.value)
    # upstream: exactly StopOnDisconnect, StopOnNotify. Ours adds the SPEC's
    # extensions, all prefixed; keys without a dot stay upstream's.
    assert [a for a in args if "." not in a] == ["StopOnDisconnect", "StopOnNotify"]
    assert args == sorted(args)
    assert args == SPEC_ARGUMENTS
    every = ok(await call(manager_bus, "GetAll", "s", [IFACE], interface=PROPS))[0]
    assert every["SupportedArguments"].value == args


# -- /containers/basic ------------------------------------------------------------------


async def test_basic(
    service: ServiceProcess,
    manager_bus: MessageBus,
    observer: Observer,
    bus: PrivateBus,
    runtime_dir: str,
) -> None:
    path, results = await add_server(
        manager_bus, "com.example.NotFlatpak", "sample-app", "sample-instance"
    )
    assert re.fullmatch(r"/org/freedesktop/DBus/Containers1/c[0-9]+", path)
    socket_path = check_add_results(results, runtime_dir)

    confined = await connect(results["Address"].value)
    try:
        # A method call from the confined app to the bus driver.
        reply = ok(await driver_call(confined, "GetNameOwner", "s", [DRIVER]))
        assert reply == [DRIVER]
        # ... and to the unconfined manager.
        pong = await call(
            confined,
            "Ping",
            destination=manager_bus.unique_name,
            path="/",
            interface="org.freedesktop.DBus.Peer",
        )
        assert ok(pong) == [] and pong.signature == ""

        # Broadcasts from the confined app and from an unconfined one both reach
        # a third connection, each with its own sender.
        await c1.add_match(observer.bus, "interface='com.example.Shouting'")
        for who in (confined, manager_bus):
            before = len(observer.signals("com.example.Shouting", "Shouted"))
            await who.send(Message.new_signal("/", "com.example.Shouting", "Shouted"))
            await observer.wait_for(
                lambda b=before: len(observer.signals("com.example.Shouting", "Shouted")) > b,
                "Shouted",
            )
            assert observer.signals("com.example.Shouting", "Shouted")[-1].sender == who.unique_name

        # The confined app is not privileged.
        err = error(
            await driver_call(confined, "UpdateActivationEnvironment", "a{ss}", [{}]),
            "AccessDenied",
        )
        assert err

        info = ok(await call(manager_bus, "GetConnectionInfo", "s", [confined.unique_name]))
        assert info[0] == path
        assert info[1]["UnixUserID"].value == os.getuid()
        assert info[2:5] == ["com.example.NotFlatpak", "sample-app", "sample-instance"]
        assert info[5] == {}

        sinfo = ok(await call(manager_bus, "GetServerInfo", "o", [path]))
        assert sinfo[0]["UnixUserID"].value == os.getuid()
        assert sinfo[1:4] == ["com.example.NotFlatpak", "sample-app", "sample-instance"]
        assert sinfo[4] == {}

        # The socket is cleaned up when the bus goes away.
        bus.stop()
        await c1.wait_until(lambda: not os.path.exists(socket_path), "the socket to be unlinked")
        rc = await asyncio.to_thread(service.process.wait, 5)
        assert rc != 0, "the service must exit non-zero when it loses the bus"
        assert service.sockets() == []
    finally:
        confined.disconnect()


# -- /containers/wrong-uid ------------------------------------------------------------------


async def test_wrong_uid(
    service: ServiceProcess, manager_bus: MessageBus, observer: Observer, runtime_dir: str
) -> None:
    path, results = await add_server(
        manager_bus, "com.example.NotFlatpak", "sample-app", "instance1"
    )
    socket_path = socket_path_of(results)
    # Sanity: our own uid is welcome (so the check below can fail).
    assert (await asyncio.to_thread(sasl_probe, socket_path)).startswith(b"OK ")
    with reachable_by_others(socket_path, runtime_dir):
        child = await asyncio.to_thread(probe_as_nobody, socket_path)
        # The connection was unceremoniously closed: not even a SASL answer.
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == f"CLOSED {NOBODY} b''", child.stdout
        # A real client as that uid fails the same way (upstream: G_IO_ERROR_CLOSED).
        rc, out, _err = await gdbus_call(
            results["Address"].value, "/org/freedesktop/DBus", "org.freedesktop.DBus.GetId",
            dest=DRIVER, nobody=True,
        )
        assert rc != 0, out
    await observer.sync()
    # Nothing reached the bus on that uid's behalf, and the server is intact.
    assert observer.new_unique_names() == []
    assert await list_servers(manager_bus) == [path]
    client = await connect(results["Address"].value)
    client.disconnect()


# -- /containers/metadata ----------------------------------------------------------------------


async def test_metadata(service_factory, manager_bus: MessageBus, runtime_dir: str) -> None:  # type: ignore[no-untyped-def]
    service_factory(*LIMIT_CONTAINERS)
    metadata = {
        "Species": Variant("s", "Martes martes"),
        "IsCrepuscular": Variant("b", True),
        "NChildren": Variant("u", 2),
    }
    # Empty app and instance ids are fine.
    path, results = await add_server(manager_bus, "org.example.Springwatch", "", "", metadata)
    check_add_results(results, runtime_dir)
    confined = await connect(results["Address"].value)
    try:
        # The confined app asks about itself.
        reply = await call(confined, "GetConnectionCredentials", "s", [confined.unique_name])
        c1.close_fds(reply)
        creds = ok(reply)[0]
        assert creds["org.freedesktop.DBus.Containers1.Path"].signature == "o"
        assert creds["org.freedesktop.DBus.Containers1.Path"].value == path

        def check(creator: dict[str, Variant], rest: list[object]) -> None:
            assert creator["UnixUserID"].value == os.getuid()
            assert rest[:3] == ["org.example.Springwatch", "", ""]
            md = rest[3]
            assert isinstance(md, dict) and len(md) == 3
            assert (md["NChildren"].signature, md["NChildren"].value) == ("u", 2)
            assert (md["IsCrepuscular"].signature, md["IsCrepuscular"].value) == ("b", True)
            assert (md["Species"].signature, md["Species"].value) == ("s", "Martes martes")

        reply = await call(manager_bus, "GetConnectionInfo", "s", [confined.unique_name])
        assert reply.signature == "oa{sv}sssa{sv}"
        info = ok(reply)
        assert info[0] == path
        check(info[1], info[2:])

        reply = await call(manager_bus, "GetServerInfo", "o", [path])
        assert reply.signature == "a{sv}sssa{sv}"
        sinfo = ok(reply)
        check(sinfo[0], sinfo[1:])
    finally:
        confined.disconnect()


# -- /containers/stop-server/* --------------------------------------------------------------

STOP_MODES = [
    "explicitly",
    "disconnect-first",
    "never-connected",
    "force",
    "via-notify",
    "not-with-manager",
    "with-manager",
]


@pytest.mark.parametrize("mode", STOP_MODES)
async def test_stop_server(
    mode: str,
    service: ServiceProcess,
    manager_bus: MessageBus,
    observer: Observer,
    bus: PrivateBus,
) -> None:
    named: dict[str, Variant] = {}
    fds: list[int] = []
    write_end: int | None = None
    if mode == "not-with-manager":
        named["StopOnDisconnect"] = Variant("b", False)
    if mode in ("via-notify", "not-with-manager"):
        read_end, write_end = os.pipe()
        named["StopOnNotify"] = Variant("h", 0)
        fds = [read_end]
    confined: MessageBus | None = None
    try:
        path, results = await add_server(
            manager_bus, "com.example.NotFlatpak", "sample-app", "", named=named, unix_fds=fds
        )
        for fd in fds:
            os.close(fd)  # the service holds its own copy now
        address = results["Address"].value
        socket_path = socket_path_of(results)

        if mode != "never-connected":
            confined = await connect(address)
            if mode == "disconnect-first":
                name = confined.unique_name
                confined.disconnect()
                confined = None
                await observer.wait_name_gone(name)

        await assert_gdbus_stop_denied_for_other_uid(bus, path)
        await observer.sync()
        assert path not in observer.removed()

        if mode == "with-manager":
            name = manager_bus.unique_name
            manager_bus.disconnect()
            await observer.wait_name_gone(name)
        elif mode == "explicitly":
            ok(await call(manager_bus, "StopListening", "o", [path]))
            # The server remains while its connection lives: if ServerRemoved
            # were coming it would arrive before this second reply.
            err = await call(manager_bus, "NoSuchMethod")
            error(err, "UnknownMethod")
            await observer.sync()
            assert path not in observer.removed()
        elif mode in ("via-notify", "not-with-manager"):
            if mode == "not-with-manager":
                name = manager_bus.unique_name
                manager_bus.disconnect()
                await observer.wait_name_gone(name)
                # StopOnDisconnect=false: the server still listens.
                await observer.sync()
                assert os.path.exists(socket_path)
                assert path in await list_servers(observer.bus)
            assert write_end is not None
            os.close(write_end)
            write_end = None
        elif mode in ("disconnect-first", "never-connected"):
            ok(await call(manager_bus, "StopListening", "o", [path]))
            await observer.wait_removed(path)
        elif mode == "force":
            ok(await call(manager_bus, "StopServer", "o", [path]))
            await observer.wait_removed(path)

        # Connecting again fails (asynchronously for the notify/manager cases),
        # and the socket file is gone.
        await c1.wait_until(lambda: not os.path.exists(socket_path), "the socket to be unlinked")
        assert connect_errno(socket_path) in GONE
        with pytest.raises(OSError) as exc_info:
            late = await connect(address)
            late.disconnect()
        assert exc_info.value.errno in GONE

        if mode == "force":
            assert confined is not None
            await c1.wait_disconnected(confined)
        elif mode in ("explicitly", "via-notify", "not-with-manager", "with-manager"):
            assert confined is not None
            # The confined app still works...
            assert ok(await driver_call(confined, "GetNameOwner", "s", [DRIVER])) == [DRIVER]
            # ... and its server is still known until it leaves.
            sinfo = ok(await call(observer.bus, "GetServerInfo", "o", [path]))
            assert sinfo[0]["UnixUserID"].value == os.getuid()
            assert sinfo[1:] == ["com.example.NotFlatpak", "sample-app", "", {}]
            await observer.sync()
            assert path not in observer.removed()
            confined.disconnect()

        await observer.wait_removed(path)
        error(await call(observer.bus, "GetServerInfo", "o", [path]), "NotContainer")
        await observer.sync()
        assert observer.removed().count(path) == 1
        for e in observer.events:
            if e.kind == "removed":
                assert e.args[1:] == (PATH, "o")
    finally:
        if confined is not None:
            confined.disconnect()
        if write_end is not None:
            os.close(write_end)


# -- /containers/invalid-metadata-getters -------------------------------------------------


async def test_invalid_metadata_getters(service: ServiceProcess, manager_bus: MessageBus) -> None:
    error(
        await call(manager_bus, "GetConnectionInfo", "s", [manager_bus.unique_name]), "NotContainer"
    )
    error(await call(manager_bus, "GetConnectionInfo", "s", [DRIVER]), "NotContainer")
    error(await call(manager_bus, "GetConnectionInfo", "s", ["com.example.Nope"]), "NameHasNoOwner")
    error(await call(manager_bus, "GetServerInfo", "o", ["/nope"]), "NotContainer")
    error(await call(manager_bus, "GetServerInfo", "o", [PATH + "/c0"]), "NotContainer")


# -- /containers/unsupported-parameter ------------------------------------------------------


async def test_unsupported_parameter(service: ServiceProcess, manager_bus: MessageBus) -> None:
    reply = await call(
        manager_bus,
        "AddServer",
        "sssa{sv}a{sv}",
        [
            "com.example.NotFlatpak",
            "sample-app",
            "",
            {},
            {"ThisArgumentIsntImplemented": Variant("b", False)},
        ],
    )
    error(reply, "InvalidArgs")
    assert await list_servers(manager_bus) == []
    assert service.sockets() == []


# -- /containers/invalid-type-name ----------------------------------------------------------


@pytest.mark.parametrize(
    "container_type",
    [
        "this is not a valid container type name",
        "",
        "flatpak",
        "org..flatpak",
        "1org.flatpak",
        "org.flatpak.",
    ],
)
async def test_invalid_type_name(
    service: ServiceProcess, manager_bus: MessageBus, container_type: str
) -> None:
    reply = await call(
        manager_bus, "AddServer", "sssa{sv}a{sv}", [container_type, "sample-app", "", {}, {}]
    )
    error(reply, "InvalidArgs")
    assert await list_servers(manager_bus) == []
    assert service.sockets() == []


# -- /containers/invalid-nesting ------------------------------------------------------------


async def test_invalid_nesting(service: ServiceProcess, manager_bus: MessageBus) -> None:
    path, results = await add_server(
        manager_bus, "com.example.NotFlatpak", "sample-app", "instance0"
    )
    confined = await connect(results["Address"].value)
    try:
        reply = await add_server_reply(confined, "com.example.NotFlatpak", "inner-app", "instance1")
        error(reply, "AccessDenied")
        # Nor may it stop its own server.
        for member in ("StopServer", "StopListening"):
            error(await call(confined, member, "o", [path]), "AccessDenied")
        # ... not even through its server object (SPEC §6).
        for member in ("Stop", "StopListening"):
            error(await call(confined, member, path=path, interface=SERVER_IFACE), "AccessDenied")
        assert await list_servers(manager_bus) == [path]
        assert len(service.sockets()) == 1
        assert ok(await driver_call(confined, "GetNameOwner", "s", [DRIVER])) == [DRIVER]
    finally:
        confined.disconnect()


# -- /containers/max-containers, /containers/max-containers-per-user ---------------------------


@pytest.mark.parametrize(
    "limits", [MAX_CONTAINERS, LIMIT_CONTAINERS], ids=["max-containers", "max-containers-per-user"]
)
async def test_max_containers(
    service_factory, manager_bus: MessageBus, limits: tuple[str, ...]
) -> None:  # type: ignore[no-untyped-def]
    sp = service_factory(*limits)
    placeholders = []
    for _ in range(3):
        path, _results = await add_server(
            manager_bus, "com.example.NotFlatpak", "sample-app", "instance1"
        )
        placeholders.append(path)
    reply = await add_server_reply(manager_bus, "com.example.NotFlatpak", "sample-app", "instance1")
    error(reply, "LimitsExceeded")
    assert len(sp.sockets()) == 3
    ok(await call(manager_bus, "StopListening", "o", [placeholders[1]]))
    path, _results = await add_server(
        manager_bus, "com.example.NotFlatpak", "sample-app", "instance1"
    )
    assert path not in placeholders
    assert sorted(await list_servers(manager_bus)) == sorted(
        [placeholders[0], placeholders[2], path]
    )


# -- /containers/max-connections-per-container ----------------------------------------------


async def test_max_connections_per_container(service_factory, manager_bus: MessageBus) -> None:  # type: ignore[no-untyped-def]
    import socket as socketmod

    service_factory(*LIMIT_CONTAINERS)
    paths, addresses = [], []
    for _ in range(2):
        _path, results = await add_server(manager_bus, "com.example.NotFlatpak", "sample-app", "")
        paths.append(socket_path_of(results))
        addresses.append(results["Address"].value)
    # The limit applies to any connection to the socket, not just D-Bus
    # connections that finished the handshake.
    placeholders = []
    try:
        for i in range(6):
            s = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
            s.connect(paths[i % 2])
            placeholders.append(s)

        async def assert_full(i: int) -> None:
            # Raw: closed without a word. Real client: the connection fails.
            assert await asyncio.to_thread(sasl_probe, paths[i]) == b""
            with pytest.raises(Exception) as exc_info:
                extra = await asyncio.wait_for(connect(addresses[i]), 5)
                extra.disconnect()
            assert not isinstance(exc_info.value, asyncio.TimeoutError)

        for i in range(2):
            await assert_full(i)

        # Free one slot (placeholder #2 is on the first socket).
        placeholders[2].close()
        confined: MessageBus | None = None
        deadline = asyncio.get_running_loop().time() + 3
        while confined is None:
            try:
                confined = await connect(addresses[0])
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.02)
        try:
            assert ok(await driver_call(confined, "GetNameOwner", "s", [DRIVER])) == [DRIVER]
            for i in range(2):
                await assert_full(i)
        finally:
            confined.disconnect()
    finally:
        for s in placeholders:
            s.close()


# -- /containers/max-container-metadata-bytes ------------------------------------------------


async def test_max_container_metadata_bytes(service_factory, manager_bus: MessageBus) -> None:  # type: ignore[no-untyped-def]
    sp = service_factory(*LIMIT_CONTAINERS)
    reply = await call(
        manager_bus,
        "AddServer",
        "sssa{sv}a{sv}",
        [
            "com.wasteheadquarters",
            "Packt Like Sardines in a Crushd Tin Box",
            "",
            {"waste of space": Variant("ay", bytes(4096))},
            {},
        ],
    )
    error(reply, "LimitsExceeded")
    assert await list_servers(manager_bus) == []
    assert sp.sockets() == []
