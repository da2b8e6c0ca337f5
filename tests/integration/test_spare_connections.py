"""Spare bus connections (proxy/spare.py) with a real dbus-daemon and clients we did not write.

The bus here drops unauthenticated connections after 300 ms (dbus-daemon's
auth_timeout; 5 s by default), so the spare kept for the next client is
regularly dropped under it: no client may ever pay for that.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ServiceProcess, add_server
from tests.support.bus import PrivateBus, started_bus
from tests.support.rawconn import RawConn
from tests.support.sasl import BEGIN, NEGOTIATE, opening

DRIVER = "org.freedesktop.DBus"


@pytest.fixture
def bus(runtime_dir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBus]:
    """A private dbus-daemon that drops unfinished handshakes after 300 ms."""
    b = started_bus(limits={"auth_timeout": 300})
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", b.address)
    yield b
    b.stop()


def get_id_argv(address: str) -> list[str]:
    """dbus-send asking the bus driver for its GetId through ``address``."""
    return ["dbus-send", f"--bus={address}", "--print-reply", f"--dest={DRIVER}",
            "/org/freedesktop/DBus", f"{DRIVER}.GetId"]


def get_id(address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(get_id_argv(address), capture_output=True, text=True, timeout=10)


def socket_count(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass  # closed meanwhile
    return n


def settle_sockets(pid: int, want: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    n = socket_count(pid)
    while n != want and time.monotonic() < deadline:
        time.sleep(0.02)
        n = socket_count(pid)
    return n


async def test_clients_are_served_when_the_bus_dropped_the_spare(
    service: ServiceProcess, manager_bus: Any
) -> None:
    _path, results = await add_server(manager_bus)
    address = results["Address"].value
    for gap in (0.0, 0.6, 0.0, 0.6, 1.2, 0.0):
        time.sleep(gap)  # 0.6 s and more: the bus dropped the spare made meanwhile
        out = get_id(address)
        assert out.returncode == 0, (out.stderr, service.log())
        assert 'string "' in out.stdout
    log = service.log()
    assert "bus connection" not in log  # no session lost its bus side
    # The dead spare was found before use (the check at take), and none was kept after.
    assert log.count("closed an idle connection after") == 1


async def test_a_spare_dropped_under_a_client_is_replaced_without_it_noticing(
    service: ServiceProcess, manager_bus: Any
) -> None:
    # A client takes a fresh spare, then dawdles past the bus's 300 ms: the bus drops
    # the spare under it. The session starts again on a new connection; the client
    # finishes its handshake and works, and spares are not used on that bus again.
    _path, results = await add_server(manager_bus)
    address = results["Address"].value
    assert get_id(address).returncode == 0  # a client came: a spare is made as it ends
    time.sleep(0.05)
    slow = RawConn(address)
    slow.sock.sendall(opening(begin=False))
    assert slow.read_line().startswith(b"OK ")
    # The bus drops the spare under the session, which starts again (its own log line:
    # the check at take, which logs differently, saw a live spare).
    service.wait_for_log("closed a spare connection under the client", timeout=5)
    assert "closed an idle connection after" not in service.log()
    slow.sock.sendall(NEGOTIATE)
    assert slow.read_line() == b"AGREE_UNIX_FD\r\n"
    slow.sock.sendall(BEGIN)
    name = slow.hello()
    assert name.startswith(":")
    assert len(slow.driver("GetId").body[0]) == 32
    slow.sock.close()
    assert "bus connection" not in service.log()
    assert get_id(address).returncode == 0


async def test_a_client_that_called_before_its_hello_is_not_answered_twice(
    service: ServiceProcess, manager_bus: Any
) -> None:
    # dbus-daemon answers a call made before Hello (AccessDenied) and keeps the
    # connection: once the bus has sent anything, a dropped spare is not started again
    # (that would send the call twice and answer it twice; found in review).
    _path, results = await add_server(manager_bus)
    address = results["Address"].value
    assert get_id(address).returncode == 0
    time.sleep(0.05)
    c = RawConn(address)
    c.handshake()
    serial = c.send_call(DRIVER, "/org/freedesktop/DBus", DRIVER, "GetId")
    first = c.read_reply(serial)
    assert first.msg.error_name is not None
    time.sleep(0.6)  # the bus drops the still-unregistered connection (auth_timeout)
    try:
        second = c.read_message(timeout=1)
    except TimeoutError:
        second = None
    assert second is None  # EOF (None) or nothing: never a second answer
    assert "closed a spare connection under the client" not in service.log()
    assert get_id(address).returncode == 0
