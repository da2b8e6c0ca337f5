"""xdg-dbus-proxy's own test program passes against the drop-in (SPEC 11).

Debian's ``xdg-dbus-proxy-tests`` ships ``test-proxy`` (tests /basics and /reply),
which starts its own dbus-daemon and runs the proxy named by ``DBUS_PROXY``. It
runs in a process group of its own: on a timeout it leaves its bus behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile

import pytest

from tests.conftest import ServiceProcess
from tests.support.bus import PrivateBus
from tests.support.dropin import dropin_programs
from tests.support.packages import ensure_packages

pytestmark = pytest.mark.timeout(120)

TEST_PROXY = "/usr/libexec/installed-tests/xdg-dbus-proxy/test-proxy"


FORMS = pytest.mark.parametrize("form", ["front", "python"])


def _run_test_proxy(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen([TEST_PROXY], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its dbus-daemon, if it left one
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _check(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok 1 /basics" in done.stdout and "ok 2 /reply" in done.stdout, done.stdout
    assert "not ok" not in done.stdout


@FORMS
def test_upstream_test_proxy_in_process(runtime_dir: str, form: str) -> None:
    """No session bus at all: the drop-in serves in-process and passes."""
    ensure_packages("xdg-dbus-proxy-tests")
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, DBUS_PROXY=dropin_programs(d)[form], XDG_RUNTIME_DIR=runtime_dir)
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        done = _run_test_proxy(env)
    _check(done)
    assert "serving in this process" in done.stderr


@FORMS
def test_upstream_test_proxy_service_backed(
    bus: PrivateBus, runtime_dir: str, service: ServiceProcess, form: str
) -> None:
    """The service on our session bus proxies to test-proxy's own bus (Bus argument);
    the drop-in must not fall back."""
    ensure_packages("xdg-dbus-proxy-tests")
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, DBUS_PROXY=dropin_programs(d)[form], XDG_RUNTIME_DIR=runtime_dir,
                   DBUS_SESSION_BUS_ADDRESS=bus.address,
                   XDG_CONTAINERS_DROPIN_MODE="service")
        done = _run_test_proxy(env)
    _check(done)
    assert "unusable" not in done.stderr, done.stderr
    service.wait_for_log("new server for org.freedesktop.XdgDbusProxy")
