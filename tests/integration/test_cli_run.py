"""``xdg-containers run``: the launcher, end to end against a live service."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
from dbus_fast.aio import MessageBus

from tests.conftest import ServiceProcess, connect, connected, start_service
from tests.integration.test_cli_common import (
    RemovedWatcher,
    cli,
    cli_argv,
    cli_env,
    client_argv,
    driver_call,
    list_servers,
    read_text,
    report_of,
    server_property,
    wait_until,
)
from tests.support.bus import PrivateBus

pytestmark = pytest.mark.timeout(90)

RUN = ("run", "--type", "org.example.Test", "--app-id", "org.example.App")


async def test_run_sets_the_address_and_returns_the_status(
    service: ServiceProcess, manager_bus: MessageBus, runtime_dir: str, tmp_path: str
) -> None:
    """COMMAND gets the minted address, run exits with its status, StopOnNotify fires."""
    watcher = await RemovedWatcher(manager_bus).start()
    out = os.path.join(tmp_path, "address")
    script = (
        f'echo "$DBUS_SESSION_BUS_ADDRESS" > {out}; '
        'gdbus call --address "$DBUS_SESSION_BUS_ADDRESS" -d org.freedesktop.DBus '
        f"-o /org/freedesktop/DBus -m org.freedesktop.DBus.GetId >> {out}; exit 7"
    )
    r = await cli(*RUN, "--", "sh", "-c", script)
    assert r.returncode == 7, r.stderr
    address, bus_id = read_text(out).splitlines()
    containers = os.path.join(runtime_dir, "dbus-1", "containers")
    assert address.startswith(f"unix:path={containers}/dbus-") and ",guid=" in address
    real_id = (await driver_call(manager_bus, "GetId"))[0]
    assert bus_id == f"('{real_id}',)"
    # StopOnNotify: the command ended, so the server stopped listening; with no
    # connection left it is gone, its socket too.
    await watcher.wait_removed("/org/freedesktop/DBus/Containers1/c0")
    assert await list_servers(manager_bus) == []
    assert os.listdir(containers) == []
    log = service.log()
    assert "c0: StopOnNotify fd became readable; stopping listening" in log


async def test_run_identifies_the_app(service: ServiceProcess, manager_bus: MessageBus) -> None:
    """The command's connection is identified with the given ids and metadata."""
    r = await cli(
        *RUN,
        "--instance-id",
        "inst-42",
        "--metadata",
        "org.example.K=v",
        "--metadata",
        "x=y=z",
        "--",
        *client_argv(),
    )
    assert r.returncode == 0, r.stderr
    report = report_of(r)
    assert report["info"] == {
        "path": "/org/freedesktop/DBus/Containers1/c0",
        "type": "org.example.Test",
        "app_id": "org.example.App",
        "instance_id": "inst-42",
        "metadata": {"org.example.K": "v", "x": "y=z"},
    }
    # without --instance-id each run gets its own random one
    ids = []
    for _ in range(2):
        r = await cli(*RUN, "--", *client_argv())
        assert r.returncode == 0, r.stderr
        ids.append(report_of(r)["info"]["instance_id"])
    assert ids[0] and ids[1] and ids[0] != ids[1]


@pytest.mark.parametrize(
    ("script", "status"),
    [("exit 0", 0), ("exit 3", 3), ("kill -TERM $$", 128 + 15), ("kill -KILL $$", 128 + 9)],
)
async def test_run_propagates_exit_status(
    service: ServiceProcess, script: str, status: int
) -> None:
    """Exit codes pass through; death by signal N gives 128+N."""
    r = await cli(*RUN, "--", "sh", "-c", script)
    assert r.returncode == status, r.stderr


async def test_command_not_found_or_not_executable(
    service: ServiceProcess, manager_bus: MessageBus, tmp_path: str
) -> None:
    """127 for a missing command, 126 for a non-executable one."""
    r = await cli(*RUN, "--", "/nonexistent/command")
    assert r.returncode == 127 and "command not found" in r.stderr
    plain_file = os.path.join(tmp_path, "not-executable")
    open(plain_file, "w").close()
    r = await cli(*RUN, "--", plain_file)
    assert r.returncode == 126
    await wait_until(lambda: _no_servers(manager_bus), "the servers to go")


async def _no_servers(bus: MessageBus) -> bool:
    """True when no server is left."""
    return await list_servers(bus) == []


async def test_filter_flags_give_a_filtered_server(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    """--filter/--see/--call/--talk decide what ListNames shows through the server."""
    address = service.bus_address
    async with connected(address, address) as (visible, hidden):
        await visible.request_name("org.example.Visible")
        await hidden.request_name("org.example.Hidden")
        names = (await run_report("--filter", "--see", "org.example.Visible"))["names"]
        assert "org.example.Visible" in names
        assert visible.unique_name in names  # the owner of a visible name is visible
        assert "org.example.Hidden" not in names
        assert hidden.unique_name not in names
        # unfiltered: identified only, everything visible
        names = (await run_report())["names"]
        assert {"org.example.Visible", "org.example.Hidden", hidden.unique_name} <= set(names)
        # --call makes the name visible too; a wildcard --talk covers the prefix only
        names = (
            await run_report(
                "--filter", "--call", "org.example.Hidden=org.example.I.M@/x",
                "--talk", "org.example.Vis.*",
            )
        )["names"]
        assert "org.example.Hidden" in names and "org.example.Visible" not in names


async def run_report(*args: str) -> dict[str, Any]:
    """``run`` (with ``args``) of the test client, which must succeed; its report."""
    r = await cli(*RUN, *args, "--", *client_argv())
    assert r.returncode == 0, r.stderr
    return report_of(r)


async def test_filtered_server_counts_denials(
    service: ServiceProcess, manager_bus: MessageBus, tmp_path: str
) -> None:
    """The denied call goes through the service's filter: MessagesDenied grows."""
    go = os.path.join(tmp_path, "go")
    script = (
        'gdbus call --address "$DBUS_SESSION_BUS_ADDRESS" -d org.example.Nobody '
        f"-o / -m org.example.I.M; echo done > {go}; exec sleep 30"
    )
    proc = subprocess.Popen(
        cli_argv(*RUN, "--filter", "--", "sh", "-c", script),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await wait_until(lambda: _exists(go), "the denied call")
        (path,) = await list_servers(manager_bus)
        assert await server_property(manager_bus, path, "MessagesDenied") >= 1
    finally:
        proc.terminate()
        assert proc.wait(10) == 128 + signal.SIGTERM  # forwarded to the command


async def _exists(path: str) -> bool:
    """True once ``path`` exists."""
    return os.path.exists(path)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--call", "foo"], ["argument --call", "expected NAME=RULE"]),
        (["--broadcast", "org.example.X=bad rule"], ["argument --broadcast", "invalid rule"]),
        (["--talk", "org.example.X"], ["--talk requires --filter"]),
        (["--call", "org.example.X=*"], ["--call requires --filter"]),
        (["--filter", "--see", "bad..name"], ["argument --see"]),
        (["--metadata", "="], ["argument --metadata"]),
    ],
)
async def test_usage_errors_name_the_flag(
    runtime_dir: str, tmp_path: str, argv: list[str], words: list[str]
) -> None:
    """Bad flags exit 2 with usage naming the flag, and never run COMMAND."""
    marker = os.path.join(tmp_path, "ran")
    env = cli_env(DBUS_SESSION_BUS_ADDRESS=None)  # never gets as far as the bus
    r = await cli(*RUN, *argv, "--", "touch", marker, env=env)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("usage: ")
    for word in words:
        assert word in r.stderr, r.stderr
    assert not os.path.exists(marker)


async def test_missing_required_flags_and_command(runtime_dir: str) -> None:
    """--type, --app-id and COMMAND are required."""
    env = cli_env(DBUS_SESSION_BUS_ADDRESS=None)
    r = await cli("run", "--app-id", "a", "--", "true", env=env)
    assert r.returncode == 2 and "--type" in r.stderr
    r = await cli("run", "--type", "org.example.T", "--", "true", env=env)
    assert r.returncode == 2 and "--app-id" in r.stderr
    r = await cli(*RUN, "--", env=env)
    assert r.returncode == 2 and "no COMMAND" in r.stderr


async def test_service_errors_are_reported(service: ServiceProcess, tmp_path: str) -> None:
    """An AddServer error is shown with its name; exit 125, COMMAND not run."""
    marker = os.path.join(tmp_path, "ran")
    r = await cli("run", "--type", "notaninterfacename", "--app-id", "a", "--", "touch", marker)
    assert r.returncode == 125
    assert "AddServer failed: InvalidArgs" in r.stderr and "notaninterfacename" in r.stderr
    assert not os.path.exists(marker)


async def test_no_service_and_no_activation(bus: PrivateBus, tmp_path: str) -> None:
    """No service and no way to activate one: a clear error, exit 125."""
    marker = os.path.join(tmp_path, "ran")
    r = await cli(*RUN, "--", "touch", marker)
    assert r.returncode == 125
    assert "xdg-containers is not running on this bus, and the bus cannot start it" in r.stderr
    assert not os.path.exists(marker)


async def test_killed_launcher_stops_the_server(
    service: ServiceProcess, manager_bus: MessageBus, tmp_path: str
) -> None:
    """SIGKILL on the launcher closes the pipe: the server stops listening."""
    pidfile = os.path.join(tmp_path, "pid")
    launcher = subprocess.Popen(
        cli_argv(*RUN, "--", "sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"), env=cli_env()
    )
    try:
        await wait_until(lambda: _exists(pidfile), "the command to start")
        (path,) = await list_servers(manager_bus)
        assert await server_property(manager_bus, path, "Listening") is True
        launcher.kill()
        launcher.wait()
        # the pipe's write end died with the launcher (and it left the bus)
        await wait_until(lambda: _no_servers(manager_bus), "the server to be removed")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if os.path.exists(pidfile):
            try:
                os.kill(int(read_text(pidfile)), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


async def test_server_outlives_the_command_while_connections_remain(
    service: ServiceProcess, manager_bus: MessageBus, tmp_path: str
) -> None:
    """StopOnNotify stops listening only: a connection the command left behind still works."""
    watcher = await RemovedWatcher(manager_bus).start()
    report = os.path.join(tmp_path, "report")
    go = os.path.join(tmp_path, "go")
    # the command starts a background client and exits once it is connected
    child = (
        f"{sys.executable} -c {_shell_quote(_client_code())} --wait {go} > {report} 2>/dev/null & "
        f"while [ ! -s {report} ]; do sleep 0.05; done"
    )
    r = await cli(*RUN, "--", "sh", "-c", child)
    assert r.returncode == 0, r.stderr
    await wait_until(lambda: _has_line(report), "the background client")
    (path,) = await list_servers(manager_bus)
    await wait_until(lambda: _not_listening(manager_bus, path), "listening to stop")
    assert path not in watcher.removed
    open(go, "w").close()  # the client disconnects: now the server goes
    await watcher.wait_removed(path)


def _client_code() -> str:
    """The test client's source."""
    from tests.integration.test_cli_common import CLIENT

    return CLIENT


def _shell_quote(text: str) -> str:
    """``text`` quoted for sh."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


async def _has_line(path: str) -> bool:
    """True once ``path`` holds a complete line."""
    return os.path.exists(path) and read_text(path).endswith("\n")


async def _not_listening(bus: MessageBus, path: str) -> bool:
    """True once the server stopped listening."""
    return await server_property(bus, path, "Listening") is False


async def test_system_bus_and_bus_flags(
    runtime_dir: str, bus: PrivateBus, manager_bus: MessageBus, other_bus: PrivateBus
) -> None:
    """--system-bus: a second server proxied to the service's idea of the system bus."""
    system = other_bus
    sp = start_service(
        bus.address, runtime_dir, env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": system.address}
    )
    try:
        system_conn = await connect(system.address)
        system_id = (await driver_call(system_conn, "GetId"))[0]
        system_conn.disconnect()
        session_id = (await driver_call(manager_bus, "GetId"))[0]
        assert system_id != session_id

        r = await cli(*RUN, "--system-bus", "--", *client_argv("--system"))
        assert r.returncode == 0, r.stderr
        report = report_of(r)
        assert report["bus_id"] == session_id
        assert report["system_bus_id"] == system_id
        containers = os.path.join(runtime_dir, "dbus-1", "containers")
        assert report["system_env"].startswith(f"unix:path={containers}/")
        assert report["system_env"] != report["env"]

        # the hidden testing option names the system server's bus explicitly
        r = await cli(
            *RUN,
            "--system-bus",
            "--system-bus-address",
            system.address,
            "--",
            *client_argv("--system"),
            env=cli_env(DBUS_SYSTEM_BUS_ADDRESS=None),
        )
        assert r.returncode == 0, r.stderr
        assert report_of(r)["system_bus_id"] == system_id

        # --bus: the command's session bus is proxied to another bus
        assert (await run_report("--bus", system.address))["bus_id"] == system_id
        await wait_until(lambda: _no_servers(manager_bus), "the servers to go")
    finally:
        sp.finish()


async def test_interrupt_reaches_the_command_not_the_launcher(
    service: ServiceProcess, manager_bus: MessageBus, tmp_path: str
) -> None:
    """SIGINT to the whole process group (Ctrl-C): the launcher waits for the command's status."""
    pidfile = os.path.join(tmp_path, "pid")
    launcher = subprocess.Popen(
        cli_argv(
            *RUN, "--", "sh", "-c", f"echo $$ > {pidfile}; trap 'exit 42' INT; sleep 30 & wait"
        ),
        env=cli_env(),
        start_new_session=True,
    )
    try:
        await wait_until(lambda: _exists(pidfile), "the command to start")
        await asyncio.sleep(0.2)
        os.killpg(launcher.pid, signal.SIGINT)
        assert await asyncio.to_thread(launcher.wait, 20) == 42
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launcher.wait()
