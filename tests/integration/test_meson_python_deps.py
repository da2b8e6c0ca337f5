"""`meson setup` checks pyproject's Python dependencies with the Python it installs for.

A venv without dbus-fast, and the checkout with a bound above this dbus-fast, must
stop `meson setup` with a message naming the Debian package and the pip
requirement; the test venv's Python passes and the summary shows its version.
(tests/integration/test_distro_install.py checks Debian 12's own python3-dbus-fast.)
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_meson_install import meson_command

ROOT = Path(__file__).resolve().parents[2]


def setup(source: Path, build: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*meson_command(), "setup", str(build), str(source), *options],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv's python with nothing installed (no dbus-fast)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import dbus_fast"], capture_output=True)
    assert probe.returncode != 0, "the bare venv can import dbus_fast"
    return python


def test_missing_dbus_fast_stops_setup(bare_python: Path, tmp_path: Path) -> None:
    done = setup(ROOT, tmp_path / "build", f"-Dpython={bare_python}")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "Python module dbus_fast (dbus-fast" in out and f"is missing for {bare_python}" in out
    assert "apt install python3-dbus-fast" in out
    assert re.search(r"pip install 'dbus-fast[<>=!0-9., ]*'", out), out


def test_the_check_can_be_turned_off(bare_python: Path, tmp_path: Path) -> None:
    """Package builds install run-time dependencies later: -Dpython_deps_check=false."""
    done = setup(ROOT, tmp_path / "build", f"-Dpython={bare_python}", "-Dpython_deps_check=false",
                 "-Danchor=disabled")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not checked (-Dpython_deps_check=false)" in done.stdout


def test_too_old_dbus_fast_stops_setup(tmp_path: Path) -> None:
    """The bound comes from pyproject.toml: raise it above this dbus-fast in a copy."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "__pycache__", "*.egg-info", ".*_cache"))
    pyproject = source / "pyproject.toml"
    text, n = re.subn(r'"dbus-fast[^"]*"', '"dbus-fast>=999.1"', pyproject.read_text())
    assert n == 1, "pyproject.toml has no dbus-fast requirement"
    pyproject.write_text(text)
    done = setup(source, tmp_path / "build", f"-Dpython={sys.executable}", "-Danchor=disabled")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    have = importlib.metadata.version("dbus-fast")
    assert f"dbus-fast {have} in {sys.executable} is too old" in out
    assert "needs dbus-fast>=999.1" in out and "apt install python3-dbus-fast" in out


def test_installed_versions_in_the_summary(tmp_path: Path) -> None:
    done = setup(ROOT, tmp_path / "build", f"-Dpython={sys.executable}", "-Danchor=disabled")
    assert done.returncode == 0, done.stdout + done.stderr
    have = importlib.metadata.version("dbus-fast")
    assert re.search(rf"python modules\s*: dbus-fast {re.escape(have)}\n", done.stdout)


def test_warns_when_python3_on_path_is_a_venv(tmp_path: Path) -> None:
    """Without -Dpython, a venv's python3 first on PATH would end up in the #! lines: say so."""
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "python3").exists()
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    done = subprocess.run(
        [*meson_command(), "setup", str(tmp_path / "build"), str(ROOT), "-Danchor=disabled"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING: python3 on PATH is a virtual environment's" in done.stdout
    assert "-Dpython=/usr/bin/python3" in done.stdout
