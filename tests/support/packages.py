"""Debian packages a test needs, installed in its set-up (the suite skips nothing)."""

from __future__ import annotations

import os
import shutil
import subprocess


def missing_packages(*names: str) -> list[str]:
    """The named Debian packages that are not installed."""
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Status}\\n", *names],
        capture_output=True, text=True, check=False,
    ).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith("installed")}
    return [n for n in names if n not in installed]


def ensure_packages(*names: str) -> None:
    """Install what is missing with apt-get (as root, or through sudo); fail loudly if not."""
    missing = missing_packages(*names)
    if not missing:
        return
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise AssertionError(f"packages {missing} are missing and this is not root")
        sudo = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [*sudo, "apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run([*sudo, "apt-get", "update"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise AssertionError(f"cannot install {missing}: {done.stderr[-2000:]}")
