"""The service runs the anchor program binary.py chooses, and either one names the app.

The C anchor is the default wherever it was built (tools/bootstrap, meson);
``XDG_CONTAINERS_ANCHOR=python`` forces ``program.py``, the fallback when no C
compiler exists, so it stays tested end to end through a real bus.
"""

from __future__ import annotations

import os
import sys

import pytest
from dbus_fast.aio import MessageBus

from tests.conftest import ServiceProcess, add_server, connect, start_service
from tests.integration.test_anchors import NO_STOP, bus_pid, identity_of
from tests.support.bus import PrivateBus
from xdg_containers.anchor.binary import BINARY, ENV, PROGRAM, anchor_command

pytestmark = pytest.mark.timeout(60)


def cmdline(pid: int) -> list[str]:
    """A process's argv, from /proc."""
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return [a.decode() for a in fh.read().split(b"\0") if a]


async def _anchor_argv(sp: ServiceProcess, bus_address: str) -> list[str]:
    """``_check_service_anchor`` from a manager connection of its own."""
    manager = await connect(bus_address)
    try:
        return await _check_service_anchor(sp, manager)
    finally:
        manager.disconnect()


async def _check_service_anchor(sp: ServiceProcess, manager: MessageBus) -> list[str]:
    """Add a flatpak server, connect through it: the bus pid is an anchor (not the service,
    not us) whose root carries the app's /.flatpak-info; that anchor's argv."""
    _path, results = await add_server(
        manager, "org.flatpak", "org.example.Chosen", "inst-c", named=NO_STOP
    )
    client = await connect(results["Address"].value)
    try:
        pid = await bus_pid(manager, client.unique_name)
    finally:
        client.disconnect()
    assert pid not in (sp.process.pid, os.getpid())
    info = identity_of(pid, ".flatpak-info")
    assert "[Application]\nname=org.example.Chosen\n" in info
    assert "[Instance]\ninstance-id=inst-c\n" in info
    assert not os.path.exists(f"/proc/{pid}/root/.xdg-containers-info")
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    return cmdline(pid)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(extra)
    return env


async def test_python_anchor_when_asked(bus: PrivateBus, runtime_dir: str) -> None:
    """XDG_CONTAINERS_ANCHOR=python: the service's anchors are program.py, and the bus pid
    of a proxied client still carries the app's identity file."""
    sp = start_service(bus.address, runtime_dir, env=_env(**{ENV: "python"}))
    try:
        argv = await _anchor_argv(sp, bus.address)
        # a forked anchor keeps its zygote's argv
        assert argv[:5] == [sys.executable, "-I", "-S", PROGRAM, "zygote"], argv
        assert "the Python anchor" in sp.wait_for_log("anchor zygote for flatpak")
    finally:
        sp.finish()


async def test_default_anchor_is_the_one_binary_py_picks(
    bus: PrivateBus, runtime_dir: str
) -> None:
    """No override: the service runs anchor_command() (the C binary in this venv once
    tools/bootstrap built it) and says so once in its log."""
    want = anchor_command()
    built = os.path.join(sys.prefix, "libexec", BINARY)
    if os.access(built, os.X_OK):
        assert want == [built]
    sp = start_service(bus.address, runtime_dir, env=_env())
    try:
        argv = await _anchor_argv(sp, bus.address)
        assert argv[: len(want) + 1] == [*want, "zygote"], argv
        log = sp.wait_for_log("anchor zygote for flatpak")
        assert ("the C anchor" if want[-1] != PROGRAM else "the Python anchor") in log
        assert log.count("anchor zygote for") == 1
    finally:
        sp.finish()
