"""A real ``flatpak run`` outlives a kill -9 of the service (issue 19, docs/flatpak.md
"Service restarts"): the app's new bus connections work while the service is away
(the drop-in serves them) and after it is back (the service does, and names the app)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import pytest

from tests.integration.flatpak_rig import APP, FlatpakRig
from tests.integration.test_dropin_flatpak import (  # noqa: F401
    _host,
    _wait_owner,
    host_peers,
    rig,
)
from tests.support.bus import PrivateBus

pytestmark = pytest.mark.timeout(120)

C1 = "org.freedesktop.DBus.Containers1"
#: Each step waits for a line on stdin; each bus call is a new connection.
APP_SCRIPT = r"""
D="--dest=org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus"
dbus-send --session --print-reply $D.ListNames >/dev/null && echo "first ok"
read -r _line
if out=$(dbus-send --session --print-reply $D.NameHasOwner string:org.example.Hidden 2>&1)
then echo "second ok $(printf '%s' "$out" | sed -n '2p' | tr -s ' ' ' ')"
else echo "second failed $out"; fi
read -r _line
dbus-test-tool echo --name=org.example.App.Echo &
echo READY
read -r _line
kill $! 2>/dev/null
echo DONE
"""


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"the app ended early: {proc.stderr.read()}")  # type: ignore[union-attr]
    return line.strip()


def _servers(address: str) -> str:
    return _host(address, f"--dest={C1}", "/org/freedesktop/DBus/Containers1",
                 f"{C1}.ListServers").stdout


@pytest.mark.parametrize("form", ["front", "python"])
def test_flatpak_app_outlives_a_service_crash(
    rig: FlatpakRig, bus: PrivateBus, runtime_dir: str, host_peers: None,  # noqa: F811
    service_factory: Any, form: str,
) -> None:
    """kill -9 of the service between two of the app's bus calls: the second works (the
    hidden name still hidden), and once a service runs again the app's next connection
    is the service's, which names the app."""
    sp = service_factory()
    env = rig.env(bus.address, runtime_dir, rig.dropins[form])
    proc = subprocess.Popen(
        ["flatpak", "run", APP, "-c", APP_SCRIPT], env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    assert proc.stdin is not None
    try:
        assert _line(proc) == "first ok"
        sp.process.kill()
        sp.process.wait()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert " ".join(_line(proc).split()) == "second ok boolean false"
        service_factory()
        deadline = time.monotonic() + 30
        while 'object path "' not in _servers(bus.address):
            assert time.monotonic() < deadline, "the drop-in did not register again"
            time.sleep(0.05)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert _line(proc) == "READY"
        unique = _wait_owner(bus.address, "org.example.App.Echo")
        info = _host(bus.address, f"--dest={C1}", "/org/freedesktop/DBus/Containers1",
                     f"{C1}.GetConnectionInfo", f"string:{unique}")
        assert f'string "{APP}"' in info.stdout, info.stdout + info.stderr
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
    except AssertionError as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        _out, err = proc.communicate(timeout=30)
        raise AssertionError(f"{exc}\nflatpak's stderr:\n{err}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert out.strip() == "DONE", out
    assert "serving in this process meanwhile" in err, err
    assert "registered again with the xdg-containers service" in err, err
