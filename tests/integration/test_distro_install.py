"""A fresh Debian 12 root, Debian's packages only: `meson install`, then activation,
AddServer, a client through the minted socket, identification and anchors work.

Runs tools/distro-test (see its header and docs/packaging.md): a cached mmdebstrap
root with `python3 meson ninja-build dbus python3-dbus-fast bubblewrap` (plus gcc,
libc6-dev, libglib2.0-bin), the COMMITTED files (git archive HEAD) installed twice
(C parts at /usr/local, Python-only at /opt/xdg-containers), the service run by an
ordinary user on a private bus activating the installed file. Needs root; the first
run on a machine builds the root (40-60 s), later ones reuse it (10-20 s in all).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.packages import ensure_packages

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(900)


def test_fresh_debian_root_install_and_service() -> None:
    assert os.geteuid() == 0, "tools/distro-test builds a root and chroots: run the suite as root"
    ensure_packages("mmdebstrap", "zstd", "bubblewrap")
    done = subprocess.run([str(ROOT / "tools" / "distro-test")], capture_output=True, text=True,
                          timeout=840, cwd=ROOT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-8000:]
    assert out.rstrip().endswith("distro-test: PASS"), out[-8000:]
    # Both installs went through every step (the tool stops at the first failure).
    for step in ("ok: AddServer through D-Bus activation (gdbus)",
                 "ok: GetId through the minted socket (dbus-send)",
                 "ok: GetConnectionInfo(", "ok: the bus sees ",
                 "ok: xdg-containers-dbus-proxy (service-backed) proxies"):
        assert out.count(step) == 2, f"{step!r} not seen for both installs:\n{out[-8000:]}"
    assert "--- c install (/usr/local), service as user (uid 1000)" in out
    assert "--- python install (/opt/xdg-containers), service as user (uid 1000)" in out
