"""Tests for spare bus connections (io/spare.py) against a listening unix socket.

The listener stands in for the bus's socket only: the pool never reads an answer
beyond a one-byte peek, so what matters is what it connects, sends and closes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

from tests.support.sasl import opening
from xdg_containers.io import spare as spare_mod
from xdg_containers.io.spare import MAX_AGE, SpareBusConnections, spares_for

AUTH = opening(begin=False)


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    d = tempfile.mkdtemp()
    path = os.path.join(d, "bus")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    srv.settimeout(5)
    yield srv, path
    srv.close()
    os.unlink(path)
    os.rmdir(d)


def _accept(srv: socket.socket) -> socket.socket:
    conn, _ = srv.accept()
    conn.settimeout(5)
    return conn


def _pool_with_spare(srv: socket.socket, path: str) -> tuple[SpareBusConnections, socket.socket]:
    """A pool after one client came and went (so it holds a spare), and the bus's side."""
    pool = SpareBusConnections(asyncio.get_running_loop())
    pool.take(path)
    pool.session_ended(path)
    return pool, _accept(srv)


async def test_first_client_gets_none_and_its_end_makes_a_spare(
    listener: tuple[socket.socket, str],
) -> None:
    srv, path = listener
    pool = SpareBusConnections(asyncio.get_running_loop())
    assert pool.take(path) is None  # nothing made before a client came
    assert len(pool) == 0
    pool.session_ended(path)
    assert len(pool) == 1 and pool.made == 1
    bus_side = _accept(srv)
    assert bus_side.recv(100) == AUTH  # connected, our AUTH sent, nothing more
    bus_side.sendall(b"OK 0123456789abcdef0123456789abcdef\r\n")
    taken = pool.take(path)
    assert taken is not None and len(pool) == 0
    sock, sasl = taken
    assert not sasl.done and sasl.start() == AUTH  # the session sends BEGIN after it
    assert sock.recv(3, socket.MSG_PEEK) == b"OK "  # the answer is left for the session
    sock.close()
    bus_side.close()
    pool.close()


@pytest.mark.parametrize("answer", [b"", b"OK 0123456789abcdef0123456789abcdef\r\n",
                                    b"REJECTED EXTERNAL\r\n"])
async def test_a_spare_the_bus_closed_or_refused_is_not_used_and_none_follows(
    listener: tuple[socket.socket, str], answer: bytes
) -> None:
    # Closed with or without its OK unread (a bus's auth timeout), or refused: never
    # handed to a session, and that bus gets no more spares (the next could die just
    # as a client takes it).
    srv, path = listener
    pool, bus_side = _pool_with_spare(srv, path)
    if answer:
        bus_side.sendall(answer)
    if not answer.startswith(b"OK"):
        bus_side.close()
    else:
        bus_side.shutdown(socket.SHUT_RDWR)
        bus_side.close()
    await asyncio.sleep(0.01)
    assert pool.take(path) is None
    assert len(pool) == 0
    pool.session_ended(path)
    assert len(pool) == 0 and pool.made == 1  # disabled for this bus
    pool.close()


async def test_an_unanswered_spare_is_usable(listener: tuple[socket.socket, str]) -> None:
    # The bus may not have read our AUTH yet: the session's BEGIN and Hello follow it.
    srv, path = listener
    pool, bus_side = _pool_with_spare(srv, path)
    taken = pool.take(path)
    assert taken is not None
    taken[0].close()
    bus_side.close()
    pool.close()


async def test_an_old_spare_is_not_used(listener: tuple[socket.socket, str]) -> None:
    srv, path = listener
    pool, bus_side = _pool_with_spare(srv, path)
    pool._spares[(None, path)].made -= MAX_AGE + 0.1  # as if made long ago
    assert pool.take(path) is None
    assert bus_side.recv(100) == AUTH and bus_side.recv(100) == b""  # closed by us
    bus_side.close()
    pool.close()


async def test_housekeeping_replaces_ageing_spares_and_stops_when_nobody_comes(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, path = listener
    monkeypatch.setattr(spare_mod, "TICK", 0.05)
    monkeypatch.setattr(spare_mod, "MAX_AGE", 0.12)
    monkeypatch.setattr(spare_mod, "DEMAND", 0.4)
    pool = SpareBusConnections(asyncio.get_running_loop())
    assert pool.take(path) is None  # a client came; its session never ends here
    await asyncio.sleep(0.08)  # the first tick makes the missing spare
    assert len(pool) == 1
    await asyncio.sleep(0.25)  # ageing spares are replaced, never older than MAX_AGE
    assert pool.made >= 2
    assert asyncio.get_running_loop().time() - pool._spares[(None, path)].made < 0.12
    await asyncio.sleep(0.35)  # demand over: the spare is closed, the tick stops
    assert len(pool) == 0 and pool._tick is None
    made = pool.made
    conns = [_accept(srv) for _ in range(made)]
    for c in conns:
        assert c.recv(100) == AUTH and c.recv(100) == b""  # every one closed again
        c.close()
    pool.close()


async def test_close_closes_spares_and_makes_no_more(listener: tuple[socket.socket, str]) -> None:
    srv, path = listener
    pool, bus_side = _pool_with_spare(srv, path)
    pool.close()
    assert bus_side.recv(100) == AUTH and bus_side.recv(100) == b""
    assert pool.take(path) is None
    pool.session_ended(path)
    assert len(pool) == 0
    bus_side.close()


async def test_no_spare_without_a_bus(tmp_path: object) -> None:
    pool = SpareBusConnections(asyncio.get_running_loop())
    missing = os.path.join(str(tmp_path), "nobody")
    pool.take(missing)
    pool.session_ended(missing)  # connect fails: logged at debug, nothing kept
    assert len(pool) == 0
    pool.close()


async def test_one_pool_per_loop() -> None:
    loop = asyncio.get_running_loop()
    assert spares_for(loop) is spares_for(loop)
    spares_for(loop).close()


async def test_spares_are_kept_for_the_most_recent_servers_only() -> None:
    """A thousand busy servers must not each hold a half-open bus connection: spares are
    kept for the MAX_KEYS (anchor, bus) keys a client came to most recently."""
    d = tempfile.mkdtemp()
    servers = []
    try:
        paths = []
        for i in range(spare_mod.MAX_KEYS + 4):
            path = os.path.join(d, f"bus{i}")
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(path)
            srv.listen(4)
            servers.append(srv)
            paths.append(path)
        pool = SpareBusConnections(asyncio.get_running_loop())
        for path in paths:
            pool.take(path)
            pool.session_ended(path)
        assert len(pool) == spare_mod.MAX_KEYS
        # the oldest were evicted: a client there finds none, the newest find theirs
        assert pool.take(paths[0]) is None
        spare = pool.take(paths[-1])
        assert spare is not None
        spare[0].close()
        pool.close()
    finally:
        for srv in servers:
            srv.close()
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)
