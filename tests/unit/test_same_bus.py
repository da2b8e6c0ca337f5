"""Tests for ``same_bus`` and ``probe_address`` (issue 16 findings 9, 10): one bus,
however its address is spelled, and an address nobody listens on."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

from xdg_containers.wire.address import escape_value, probe_address, same_bus

GUID = "0123456789abcdef0123456789abcdef"
OTHER_GUID = "fedcba9876543210fedcba9876543210"


@pytest.fixture
def listening() -> Iterator[str]:
    """The path of a listening unix socket (in a directory with a symlink to it)."""
    d = tempfile.mkdtemp(prefix="xdgc-samebus-")
    path = os.path.join(d, "bus")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    os.symlink(path, os.path.join(d, "link"))
    yield path
    sock.close()
    for name in ("bus", "link", "dead"):
        try:
            os.unlink(os.path.join(d, name))
        except FileNotFoundError:
            pass
    os.rmdir(d)


def test_guid_key_order_and_escaping_do_not_matter(listening: str) -> None:
    canonical = f"unix:path={listening},guid={GUID}"
    for spelling in (
        f"unix:path={listening}",
        f"unix:guid={GUID},path={listening}",
        "unix:path=" + "".join(f"%{b:02x}" for b in os.fsencode(listening)),
        f"unix:path={escape_value(listening)};tcp:host=localhost,port=1",
        f"tcp:host=localhost,port=1;unix:path={listening}",
        f"unix:path={os.path.dirname(listening)}/./bus",
        f"unix:path={os.path.dirname(listening)}/link",  # the same socket file
    ):
        assert same_bus(spelling, canonical), spelling
        assert same_bus(canonical, spelling), spelling


def test_different_buses_differ(listening: str) -> None:
    canonical = f"unix:path={listening},guid={GUID}"
    for other in (
        f"unix:path={listening}x",
        f"unix:abstract={listening}",
        f"unix:path={listening},guid={OTHER_GUID}",  # a restarted bus: another server
        "tcp:host=localhost,port=1",
        "",
        "nonsense",
    ):
        assert not same_bus(other, canonical), other
    assert same_bus("unix:abstract=x,guid=" + GUID, "unix:abstract=x")
    assert not same_bus("unix:abstract=x", "unix:abstract=y")
    assert same_bus("tcp:host=LocalHost,port=7", "tcp:port=7,host=localhost")
    assert not same_bus("tcp:host=localhost,port=7", "tcp:host=localhost,port=8")


def test_probe_finds_a_listener_and_names_failures(listening: str) -> None:
    d = os.path.dirname(listening)
    dead = os.path.join(d, "dead")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(dead)  # a socket file nobody listens on
    s.close()

    async def probes() -> list[str | None]:
        return [
            await probe_address(f"unix:path={listening}", 1.0),
            await probe_address(f"unix:path={d}/missing;unix:path={listening}", 1.0),
            await probe_address(f"unix:path={d}/missing", 1.0),
            await probe_address(f"unix:path={dead};unix:abstract=xdgc-none-{os.getpid()}", 1.0),
        ]

    ok1, ok2, missing, dead_text = asyncio.run(probes())
    assert ok1 is None and ok2 is None
    assert missing == f"unix:path={d}/missing: No such file or directory"
    assert dead_text == (
        f"unix:path={dead}: Connection refused; "
        f"unix:abstract=xdgc-none-{os.getpid()}: Connection refused"
    )
