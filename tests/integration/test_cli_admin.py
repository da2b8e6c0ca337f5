"""``xdg-containers list | info | identify | stop`` against a live service, and against none."""

from __future__ import annotations

import json
import os

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from tests.conftest import ServiceProcess, add_server, connect
from tests.integration.helpers_c1 import socket_path_of
from tests.integration.test_cli_common import (
    RemovedWatcher,
    cli,
    cli_env,
    driver_call,
    list_servers,
    read_report,
    server_property,
    start_client,
    wait_until,
)
from tests.support.bus import PrivateBus, started_bus
from xdg_containers.admin import NOT_RUNNING_HINT

pytestmark = pytest.mark.timeout(60)

C0 = "/org/freedesktop/DBus/Containers1/c0"
C1 = "/org/freedesktop/DBus/Containers1/c1"
NOT_RUNNING = "xdg-containers is not running on this bus"


def _table_row(stdout: str, first: str) -> list[str]:
    """The cells of the table row starting with ``first``."""
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row for {first} in:\n{stdout}")


async def test_list_table_and_json(service: ServiceProcess, manager_bus: MessageBus) -> None:
    """list shows every server with its counters, as a table and as JSON."""
    p0, r0 = await add_server(manager_bus, "org.example.One", "org.example.App1", "i-1")
    p1, _ = await add_server(manager_bus, "org.example.Two", "org.example.App2", "i-2")
    client = await connect(r0["Address"].value)
    try:
        await driver_call(client, "GetId")
        table = await cli("list")
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[0].split() == [
            "PATH",
            "TYPE",
            "APP-ID",
            "INSTANCE",
            "LISTENING",
            "CONNS",
            "FORWARDED",
            "DENIED",
        ]
        row0 = _table_row(table.stdout, p0)
        assert row0[1:6] == ["org.example.One", "org.example.App1", "i-1", "yes", "1"]
        assert int(row0[6]) > 0 and row0[7] == "0"
        assert _table_row(table.stdout, p1)[1:6] == [
            "org.example.Two",
            "org.example.App2",
            "i-2",
            "yes",
            "0",
        ]

        js = await cli("list", "--json")
        assert js.returncode == 0, js.stderr
        data = json.loads(js.stdout)
        assert [s["Path"] for s in data] == [p0, p1]
        first = data[0]
        assert first["ContainerType"] == "org.example.One"
        assert first["AppID"] == "org.example.App1"
        assert first["InstanceID"] == "i-1"
        assert first["Listening"] is True
        assert first["Connections"] == [client.unique_name]
        assert first["MessagesForwarded"] > 0
        assert first["MessagesDenied"] == 0
        assert first["Address"] == r0["Address"].value
        assert first["SocketPath"] == socket_path_of(r0)
        assert first["Creator"]["ProcessID"] == os.getpid()
    finally:
        client.disconnect()


async def test_list_with_no_servers(service: ServiceProcess) -> None:
    """An empty service says so (and gives [] in JSON)."""
    table = await cli("list")
    assert (table.returncode, table.stdout.strip()) == (0, "no servers")
    js = await cli("list", "--json")
    assert (js.returncode, json.loads(js.stdout)) == (0, [])


async def test_info_table_and_json(service: ServiceProcess, manager_bus: MessageBus) -> None:
    """info shows every property, the metadata and the creator."""
    metadata = {
        "org.example.Label": Variant("s", "hello"),
        "org.example.Count": Variant("u", 3),
        "org.example.Flags": Variant("as", ["a", "b"]),
    }
    path, results = await add_server(manager_bus, metadata=metadata)
    socket_path = socket_path_of(results)

    table = await cli("info", path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    fields = {
        k.strip(): v.strip()
        for k, _, v in (
            line.partition(":") for line in lines if ":" in line and not line.startswith("  ")
        )
    }
    assert fields["Path"] == path
    assert fields["Container type"] == "org.example.Test"
    assert fields["App ID"] == "org.example.App"
    assert fields["Instance ID"] == "instance-1"
    assert fields["Socket path"] == socket_path
    assert fields["Listening"] == "yes"
    assert fields["Connections"] == "0"
    assert f"pid {os.getpid()}" in fields["Creator"]
    assert "  org.example.Label = hello" in lines
    assert "  org.example.Count = 3" in lines
    assert "  org.example.Flags = [a, b]" in lines

    js = await cli("info", "c0", "--json")  # cN is short for the full path
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert data["Path"] == path == "/org/freedesktop/DBus/Containers1/c0"
    assert data["Metadata"] == {
        "org.example.Label": "hello",
        "org.example.Count": 3,
        "org.example.Flags": ["a", "b"],
    }
    assert data["SocketPath"] == socket_path
    assert data["Address"] == results["Address"].value
    assert data["Creator"]["UnixUserID"] == os.getuid()
    assert data["Creator"]["ProcessID"] == os.getpid()
    assert set(data) >= {"ContainerType", "AppID", "InstanceID", "Listening", "Connections",
                         "MessagesForwarded", "MessagesDenied", "Creator", "Metadata"}


async def cli_fails(code: int, text: str, *args: str) -> None:
    """The CLI exits ``code`` saying ``text`` on stderr, printing nothing on stdout."""
    r = await cli(*args)
    assert r.returncode == code and text in r.stderr and r.stdout == "", (r.stdout, r.stderr)


async def test_info_errors(service: ServiceProcess, manager_bus: MessageBus) -> None:
    """Unknown servers exit 1; a malformed path is a usage error."""
    await cli_fails(1, "no such server", "info", C0)
    await cli_fails(1, "no such server", "info", "c7", "--json")
    await cli_fails(2, "not a D-Bus object path", "info", "not/a/path")
    # a path the service does not own at all
    await cli_fails(1, "no such server", "info", "/org/example/Elsewhere")


async def test_identify_shows_the_real_process(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    """identify shows the app and the real client pid (also from the pidfd)."""
    path, results = await add_server(
        manager_bus,
        "org.example.Ident",
        "org.example.Who",
        "inst-9",
        metadata={"org.example.Key": Variant("s", "value")},
    )
    proc = start_client("--address", results["Address"].value, "--wait", "/nonexistent/never")
    try:
        report = await read_report(proc)
        name = report["unique_name"]
        # The bus sees the server's anchor (SPEC 10): neither the service nor the client ...
        bus_pid = (await driver_call(manager_bus, "GetConnectionUnixProcessID", "s", [name]))[0]
        assert bus_pid not in (service.process.pid, proc.pid)
        # ... identify shows the real client, from the pidfd too.
        js = await cli("identify", name, "--json")
        assert js.returncode == 0, js.stderr
        data = json.loads(js.stdout)
        assert data["BusName"] == name
        assert data["Server"] == path
        assert data["ContainerType"] == "org.example.Ident"
        assert data["AppID"] == "org.example.Who"
        assert data["InstanceID"] == "inst-9"
        assert data["Metadata"] == {"org.example.Key": "value"}
        assert data["ProcessID"] == proc.pid
        assert data["ProcessFD"] is True
        assert data["ProcessFDPid"] == proc.pid
        assert data["Credentials"]["UnixUserID"] == os.getuid()
        assert data["Credentials"]["org.freedesktop.DBus.Containers1.Path"] == path
        assert data["Creator"]["ProcessID"] == os.getpid()

        table = await cli("identify", name)
        assert table.returncode == 0, table.stderr
        text = table.stdout
        assert f"Server:         {path}" in text
        assert "App ID:         org.example.Who" in text
        assert f"Process ID:     {proc.pid} " in text
        assert f"ProcessFD:      yes (pidfd for pid {proc.pid})" in text
        assert "  org.example.Key = value" in text
    finally:
        proc.kill()
        proc.wait()


async def test_identify_errors(service: ServiceProcess, manager_bus: MessageBus) -> None:
    """Unconfined, bus-driver and ownerless names are clear errors (exit 1)."""
    assert manager_bus.unique_name is not None
    unconfined = "is not a container connection"
    await cli_fails(1, unconfined, "identify", manager_bus.unique_name)
    await cli_fails(1, unconfined, "identify", "org.freedesktop.DBus", "--json")
    await cli_fails(1, "no connection named :1.9999", "identify", ":1.9999")
    await cli_fails(1, "no connection named", "identify", "org.example.NobodyOwnsThis")


async def test_stop_listening_only_then_stop(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    """stop --listening-only keeps the connection; stop removes the server."""
    watcher = await RemovedWatcher(manager_bus).start()
    path, results = await add_server(manager_bus)
    socket_path = socket_path_of(results)
    client = await connect(results["Address"].value)
    try:
        r = await cli("stop", "--listening-only", path)
        assert r.returncode == 0, r.stderr
        assert "stopped listening" in r.stdout
        assert await server_property(manager_bus, path, "Listening") is False
        assert not os.path.exists(socket_path)
        # the connection keeps working
        await driver_call(client, "GetId")
        assert await list_servers(manager_bus) == [path]

        r = await cli("stop", path, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"Path": path, "Stopped": "server"}
        await watcher.wait_removed(path)
        assert await list_servers(manager_bus) == []
    finally:
        client.disconnect()


async def test_stop_plain_table_output(service: ServiceProcess, manager_bus: MessageBus) -> None:
    """stop's human output, and NotContainer as 'no such server'."""
    path, _ = await add_server(manager_bus)
    r = await cli("stop", "c0")
    assert (r.returncode, r.stdout.strip()) == (0, f"{path}: stopped")
    await wait_until(lambda: _empty(manager_bus), "the server to go")
    r = await cli("stop", path)
    assert r.returncode == 1 and f"no such server: {path}" in r.stderr
    r = await cli("stop", "--listening-only", C1, "--json")
    assert r.returncode == 1 and "no such server" in r.stderr and r.stdout == ""


async def _empty(bus: MessageBus) -> bool:
    """True when no server is left."""
    return await list_servers(bus) == []


@pytest.mark.parametrize(
    "args",
    [
        ("list",),
        ("list", "--json"),
        ("info", C0),
        ("info", C0, "--json"),
        ("identify", ":1.0"),
        ("identify", "org.example.Name", "--json"),
        ("stop", C0),
        ("stop", "--listening-only", C0, "--json"),
    ],
)
async def test_no_service_running(bus: PrivateBus, args: tuple[str, ...]) -> None:
    """Without the service every admin command says so and what to do, exits 3, prints
    nothing on stdout."""
    r = await cli(*args)
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert r.stderr.strip() == f"xdg-containers: {NOT_RUNNING}{NOT_RUNNING_HINT}"
    assert r.stdout == ""


async def test_no_bus_at_all(runtime_dir: str) -> None:
    """No session bus, or an unreachable address: exit 4."""
    r = await cli("list", env=cli_env(DBUS_SESSION_BUS_ADDRESS=None))
    assert r.returncode == 4 and "no session bus" in r.stderr
    r = await cli("list", "--address", f"unix:path={runtime_dir}/nothing-here")
    assert r.returncode == 4 and "cannot connect to the bus" in r.stderr


async def test_bus_selection_flags(service: ServiceProcess, manager_bus: MessageBus) -> None:
    """--address, --session and --system pick the bus; they exclude each other."""
    await add_server(manager_bus)
    elsewhere = started_bus()
    try:
        # --address wins over the session bus; the session bus here has no service.
        env = cli_env(DBUS_SESSION_BUS_ADDRESS=elsewhere.address)
        r = await cli("list", "--json", env=env)
        assert r.returncode == 3
        r = await cli("list", "--json", "--address", service.bus_address, env=env)
        assert r.returncode == 0 and len(json.loads(r.stdout)) == 1
        r = await cli("list", "--json", "--session", env=cli_env())
        assert r.returncode == 0 and len(json.loads(r.stdout)) == 1
        # --system reads DBUS_SYSTEM_BUS_ADDRESS
        r = await cli(
            "list",
            "--json",
            "--system",
            env=cli_env(
                DBUS_SYSTEM_BUS_ADDRESS=service.bus_address,
                DBUS_SESSION_BUS_ADDRESS=elsewhere.address,
            ),
        )
        assert r.returncode == 0 and len(json.loads(r.stdout)) == 1
        # the three are exclusive
        r = await cli("list", "--system", "--session")
        assert r.returncode == 2 and "not allowed with" in r.stderr
    finally:
        elsewhere.stop()
