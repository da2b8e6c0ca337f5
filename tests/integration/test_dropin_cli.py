"""The drop-in process itself: sync byte, --log on stdout, refusals before the sync byte."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, ServiceProcess
from tests.support.bus import PrivateBus

pytestmark = pytest.mark.timeout(60)


def _start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], int, int]:
    r, w = os.pipe()
    env = dict(env, PYTHONPATH=REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "xdg_containers.dropin.main", f"--fd={w}", *args],
        pass_fds=[w], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    os.close(w)
    return proc, r, w


def _call(path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dbus-send", f"--bus=unix:path={path}", "--print-reply", "--dest=org.freedesktop.DBus",
         "/org/freedesktop/DBus", "org.freedesktop.DBus.ListNames"],
        capture_output=True, text=True, timeout=20, check=False,
    )


def test_log_lines_on_stdout_and_exit_on_sync_close(
    bus: PrivateBus, runtime_dir: str, service: ServiceProcess
) -> None:
    """--log: served in-process (even with the service up) and every message is a line on
    the drop-in's stdout; closing the sync pipe's reader ends it and removes the socket."""
    path = os.path.join(runtime_dir, "proxy-log")
    open(path, "w").close()  # flatpak's placeholder
    proc, r, _w = _start([bus.address, path, "--filter", "--log"], dict(os.environ))
    assert os.read(r, 1) == b"x"
    done = _call(path)
    assert done.returncode == 0, done.stderr
    os.close(r)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not os.path.exists(path)
    assert "member=ListNames" in out and "member=Hello" in out, out
    assert "new server" not in service.log()


def test_refusals_exit_1_without_sync_byte(runtime_dir: str) -> None:
    """A bad name: message on stderr, exit 1, no byte on the sync pipe, no socket left."""
    path = os.path.join(runtime_dir, "proxy-bad")
    proc, r, _w = _start(["unix:path=/nonexistent", path, "--filter", "--talk=:1.1"],
                         dict(os.environ))
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert "':1.1' is not a valid dbus name" in err
    assert os.read(r, 1) == b""  # EOF, no sync byte
    os.close(r)
    assert not os.path.exists(path)


def test_service_backed_unlinks_on_sigterm(
    bus: PrivateBus, runtime_dir: str, service: ServiceProcess
) -> None:
    """Service-backed without --fd: SIGTERM ends it with status 0 and its socket gone;
    its server is removed (the service saw it leave)."""
    path = os.path.join(runtime_dir, "proxy-term")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "xdg_containers.dropin.main", bus.address,
                             path], env=env, stderr=subprocess.PIPE, text=True)
    service.wait_for_log("new server for org.freedesktop.XdgDbusProxy")
    assert _call(path).returncode == 0
    proc.terminate()
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not os.path.exists(path)
    service.wait_for_log("removed")


def test_unresponsive_service_falls_back_within_2s(bus: PrivateBus, runtime_dir: str) -> None:
    """Someone owns the Containers1 name and never answers in time: after 2 s the drop-in
    says so once and serves in-process; the client that connected meanwhile waited in
    the backlog and is served."""
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus.address)
    squatter = subprocess.Popen(
        ["dbus-test-tool", "echo", "--name=org.freedesktop.DBus.Containers1",
         "--sleep-ms=20000"], env=env, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            owner = subprocess.run(
                ["dbus-send", f"--bus={bus.address}", "--print-reply",
                 "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                 "org.freedesktop.DBus.NameHasOwner",
                 "string:org.freedesktop.DBus.Containers1"],
                capture_output=True, text=True, check=False,
            )
            if "true" in owner.stdout:
                break
            time.sleep(0.05)
        path = os.path.join(runtime_dir, "proxy-slow")
        proc, r, _w = _start([bus.address, path, "--filter"], env)
        start = time.monotonic()
        assert os.read(r, 1) == b"x"
        done = _call(path)  # connected before the fallback: waits in the backlog
        took = time.monotonic() - start
        assert done.returncode == 0, done.stderr
        assert 1.5 < took < 15, took
        os.close(r)
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert err.count("serving in this process") == 1, err
        assert "no answer from the service in time" in err
    finally:
        squatter.terminate()
        squatter.wait(10)
