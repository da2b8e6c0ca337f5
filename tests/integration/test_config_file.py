"""``serve --config FILE``: the shipped example file parses, and its limits take effect."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from tests.conftest import REPO, ServiceProcess, add_server, call, error
from xdg_containers.config import Limits, load_config


def test_shipped_example_config_lists_every_default() -> None:
    example = os.path.join(REPO, "data", "config", "xdg-containers.conf")
    assert load_config(example) == Limits()


async def test_limits_from_the_config_file_apply(service_factory, manager_bus):  # type: ignore[no-untyped-def]
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as fh:
        fh.write("[limits]\nmax_servers = 1\n")
    try:
        sp: ServiceProcess = service_factory("--config", fh.name)
        await add_server(manager_bus)
        text = error(
            await call(manager_bus, "AddServer", "sssa{sv}a{sv}",
                       ["org.example.Test", "a", "b", {}, {}]),
            "LimitsExceeded",
        )
        assert "max_servers=1" in text
        assert sp.process.poll() is None
    finally:
        os.unlink(fh.name)


def test_bad_config_file_is_refused_at_start_with_the_key_named(bus, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as fh:
        fh.write("[limits]\nmax_servrs = 3\n")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "xdg_containers", "serve", "--address", bus.address,
             "--config", fh.name],
            capture_output=True, text=True, timeout=20, cwd=REPO,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        assert proc.returncode == 2
        assert "max_servrs" in proc.stderr
    finally:
        os.unlink(fh.name)
