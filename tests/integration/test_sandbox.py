"""``xdg-containers run --sandbox``: bubblewrap with the minted socket as the only bus."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest
from dbus_fast.aio import MessageBus

from tests.conftest import ServiceProcess, connect, start_service
from tests.integration import test_cli_common as common
from tests.integration.test_cli_common import cli, cli_env, client_argv, driver_call, report_of
from tests.support.bus import PrivateBus
from xdg_containers.app.launcher_sandbox import sandbox_command

pytestmark = pytest.mark.timeout(90)

RUN = ("run", "--type", "org.example.Sandboxed", "--app-id", "org.example.Boxed")


def test_bwrap_is_installed() -> None:
    """The sandbox tests may not be skipped: bubblewrap must be there."""
    assert shutil.which("bwrap"), "bubblewrap (bwrap) is required"


async def test_sandbox_hides_the_real_bus(
    service: ServiceProcess, manager_bus: MessageBus, runtime_dir: str, tmp_path: str
) -> None:
    """Inside: no real bus, the minted one at $XDG_RUNTIME_DIR/bus; outside: identified."""
    real = service.bus_address
    go = os.path.join(tmp_path, "go")
    # what a desktop session keeps there: the user manager's control socket, an agent,
    # and a display socket (the only one of the three an app may see)
    os.makedirs(os.path.join(runtime_dir, "systemd"), exist_ok=True)
    private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    private.bind(os.path.join(runtime_dir, "systemd", "private"))
    private.listen(1)
    os.makedirs(os.path.join(runtime_dir, "gnupg"), exist_ok=True)
    open(os.path.join(runtime_dir, "wayland-0"), "w").close()
    before = sorted(os.listdir(runtime_dir))
    proc = subprocess.Popen(
        common.cli_argv(
            *RUN,
            "--sandbox",
            "--metadata",
            "org.example.Where=box",
            "--",
            *client_argv("--try", real, "--wait", go),
        ),
        env=cli_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        report = await common.read_report(proc)
        # the host bus is out of reach from inside
        assert report["tries"][real].startswith("failed"), report["tries"]
        # the minted socket sits where the session bus usually is
        assert report["env"] == f"unix:path={runtime_dir}/bus"
        assert "bus" in report["runtime"] and "dbus-1" not in report["runtime"]
        assert "wayland-0" in report["runtime"]
        # nor the service's records of every app's server (metadata, policy)
        assert "xdg-containers" not in report["runtime"]
        assert "systemd" not in report["runtime"] and "gnupg" not in report["runtime"]
        assert report["info"]["app_id"] == "org.example.Boxed"
        assert report["info"]["metadata"] == {"org.example.Where": "box"}
        real_id = (await driver_call(manager_bus, "GetId"))[0]
        assert report["bus_id"] == real_id
        # seen from the host: identified, with the real (host) pid
        r = await cli("identify", report["unique_name"], "--json")
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["AppID"] == "org.example.Boxed"
        assert data["ContainerType"] == "org.example.Sandboxed"
        assert data["ProcessID"] != report["pid"]  # its own pid namespace
        assert data["ProcessFDPid"] == data["ProcessID"]
        with open(f"/proc/{data['ProcessID']}/cmdline", "rb") as fh:
            assert b"--wait" in fh.read()
        # the bus sees the launcher's anchor (SPEC 10): alive, not the service, not the
        # launcher, not the app, outside the app's pid namespace, with the app's identity
        anchor = (await driver_call(manager_bus, "GetConnectionUnixProcessID", "s",
                                    [report["unique_name"]]))[0]
        assert anchor not in (service.process.pid, proc.pid, data["ProcessID"])
        with open(f"/proc/{anchor}/root/.xdg-containers-info", encoding="utf-8") as fh:
            info = fh.read()
        assert "app-id=org.example.Boxed\n" in info and "type=org.example.Sandboxed\n" in info
        assert os.readlink(f"/proc/{anchor}/ns/pid") != os.readlink(
            f"/proc/{data['ProcessID']}/ns/pid"
        )
        open(go, "w").close()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        private.close()
    # nothing was created on the host side, and the server is gone
    # The service's own registry directory (SPEC 13 records) may appear; nothing else.
    assert [e for e in sorted(os.listdir(runtime_dir)) if e != "xdg-containers"] == [
        e for e in before if e != "xdg-containers"]
    await common.wait_until(lambda: _no_servers(manager_bus), "the server to go")


async def _no_servers(bus: MessageBus) -> bool:
    """True when no server is left."""
    return await common.list_servers(bus) == []


@pytest.mark.parametrize(
    ("script", "status"), [("exit 0", 0), ("exit 5", 5), ("kill -TERM $$", 128 + 15)]
)
async def test_sandbox_exit_status(service: ServiceProcess, script: str, status: int) -> None:
    """Statuses pass through bwrap."""
    r = await cli(*RUN, "--sandbox", "--", "sh", "-c", script)
    assert r.returncode == status, r.stderr


async def test_sandbox_with_filter(service: ServiceProcess, manager_bus: MessageBus) -> None:
    """Filtering applies inside the sandbox; the real bus stays hidden."""
    other = await connect(service.bus_address)
    try:
        await other.request_name("org.example.Secret")
        r = await cli(
            *RUN, "--sandbox", "--filter", "--", *client_argv("--try", service.bus_address)
        )
        assert r.returncode == 0, r.stderr
        report = report_of(r)
        assert "org.example.Secret" not in report["names"]
        # asking the service about itself is allowed through the filter
        assert report["info"]["app_id"] == "org.example.Boxed"
        assert report["tries"][service.bus_address].startswith("failed")
    finally:
        other.disconnect()


async def test_sandbox_system_bus(
    runtime_dir: str, bus: PrivateBus, manager_bus: MessageBus, other_bus: PrivateBus
) -> None:
    """--sandbox --system-bus: the system bus is a minted socket too; the real one is hidden."""
    system = other_bus
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": system.address}
    sp = start_service(bus.address, runtime_dir, env=env)
    try:
        conn = await connect(system.address)
        system_id = (await driver_call(conn, "GetId"))[0]
        conn.disconnect()
        r = await cli(
            *RUN,
            "--sandbox",
            "--system-bus",
            "--",
            *client_argv("--system", "--try", system.address, "--try", bus.address),
            env=cli_env(DBUS_SYSTEM_BUS_ADDRESS=system.address),
        )
        assert r.returncode == 0, r.stderr
        report = report_of(r)
        assert report["system_bus_id"] == system_id
        assert report["tries"][system.address].startswith("failed")
        assert report["tries"][bus.address].startswith("failed")
        assert report["system_env"] in (
            "unix:path=/run/dbus/system_bus_socket",
            f"unix:path={runtime_dir}/system_bus_socket",
        )
        await common.wait_until(lambda: _no_servers(manager_bus), "the servers to go")
    finally:
        sp.finish()


# -- the bwrap command line itself ----------------------------------------------------------


def _pairs(argv: list[str], option: str, width: int = 1) -> list[list[str]]:
    """The ``width`` values after each occurrence of ``option``."""
    return [argv[i + 1 : i + 1 + width] for i, a in enumerate(argv) if a == option]


def test_sandbox_command_line(tmp_path: str) -> None:
    """The bwrap command hides the bus dirs, rebuilds the runtime dir, binds the socket."""
    runtime = os.path.join(tmp_path, "runtime")
    os.makedirs(os.path.join(runtime, "dbus-1", "containers"))
    os.makedirs(os.path.join(tmp_path, "busdir"))
    open(os.path.join(runtime, "wayland-0"), "w").close()
    open(os.path.join(runtime, "bus"), "w").close()
    os.symlink("elsewhere", os.path.join(runtime, "link"))
    minted = os.path.join(runtime, "dbus-1", "containers", "dbus-1234")
    sb = sandbox_command(
        ["app", "--flag"],
        runtime_dir=runtime,
        session_socket=minted,
        hide_addresses=[f"unix:path={tmp_path}/busdir/bus", "unix:abstract=/tmp/dbus-x"],
    )
    argv = sb.argv
    assert argv[:5] == ["bwrap", "--dev-bind", "/", "/", "--unshare-pid"]
    assert argv[-3:] == ["--", "app", "--flag"]
    assert "--unshare-net" in argv  # an abstract socket can only be hidden that way
    tmpfs = [p[0] for p in _pairs(argv, "--tmpfs")]
    assert os.path.join(str(tmp_path), "busdir") in tmpfs and runtime in tmpfs
    binds = _pairs(argv, "--bind", 2)
    assert [minted, os.path.join(runtime, "bus")] in binds
    # the runtime dir's entries come back, but not bus or dbus-1
    kept = [p[0] for p in _pairs(argv, "--bind-try", 2)]
    assert kept == [os.path.join(runtime, "wayland-0")]
    # only display and sound sockets come back: no symlink, nothing that controls the host
    assert _pairs(argv, "--symlink", 2) == []
    assert sb.env == {"DBUS_SESSION_BUS_ADDRESS": f"unix:path={runtime}/bus"}


def test_sandbox_hides_a_socket_next_to_the_runtime_dir(tmp_path: str) -> None:
    """A bus socket whose directory also holds the runtime dir gets /dev/null bound over it."""
    runtime = os.path.join(tmp_path, "runtime")
    os.makedirs(runtime)
    sock = os.path.join(tmp_path, "bus")
    open(sock, "w").close()
    sb = sandbox_command(
        ["app"],
        runtime_dir=runtime,
        session_socket=os.path.join(runtime, "minted"),
        hide_addresses=[f"unix:path={sock}"],
    )
    assert ["/dev/null", sock] in _pairs(sb.argv, "--ro-bind", 2)
    assert str(tmp_path) not in [p[0] for p in _pairs(sb.argv, "--tmpfs")]
    assert "--unshare-net" not in sb.argv
