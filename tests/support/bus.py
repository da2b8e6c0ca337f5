"""The private-bus test plugin: a dbus-daemon per test, with activatable services and limits.

The product keeps only what ``serve --private`` needs (``xdg_containers.privatebus``); the
knobs tests and benchmarks turn (service dirs, bus limits, the daemon's environment) live
here, with the ``runtime_dir`` and ``bus`` fixtures (``pytest_plugins`` in tests/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from xml.sax.saxutils import escape

import pytest

from xdg_containers import privatebus


class PrivateBus(privatebus.PrivateBus):
    """The product's private bus plus service dirs, extra ``<limit>``s and an environment."""

    def __init__(
        self,
        service_dirs: list[str] | None = None,
        env: dict[str, str] | None = None,
        limits: dict[str, int] | None = None,
    ) -> None:
        """``service_dirs``: directories of activatable .service files; ``limits``:
        extra ``<limit>`` settings (benchmarks raise max_replies_per_connection)."""
        super().__init__()
        self.env = env
        self._extra = [f"<servicedir>{escape(d)}</servicedir>" for d in service_dirs or []]
        self._extra += [
            f'<limit name="{escape(k)}">{int(v)}</limit>' for k, v in (limits or {}).items()
        ]

    def config(self) -> str:
        """The product's configuration with our service dirs and limits."""
        return privatebus.CONFIG.format(
            socket=escape(self.socket_path), extra="\n  ".join(self._extra)
        )

    def __enter__(self) -> PrivateBus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private XDG_RUNTIME_DIR for the test."""
    d = tempfile.mkdtemp(prefix="xdgc-runtime-")
    os.chmod(d, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def bus(runtime_dir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBus]:
    """A private dbus-daemon; DBUS_SESSION_BUS_ADDRESS points at it."""
    with PrivateBus() as b:
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", b.address)
        yield b


def started_bus(
    service_dirs: list[str] | None = None,
    env: dict[str, str] | None = None,
    limits: dict[str, int] | None = None,
) -> PrivateBus:
    """A PrivateBus already running (the caller stops it)."""
    b = PrivateBus(service_dirs, env, limits)
    b.start()
    return b


@pytest.fixture
def other_bus() -> Iterator[PrivateBus]:
    """A second private dbus-daemon (another session or the "system" bus), stopped after
    the test."""
    with PrivateBus() as b:
        yield b
