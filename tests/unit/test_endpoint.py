"""Endpoint: batched writes keep fds with their message; a handler bug closes only that socket."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from xdg_containers.io.endpoint import Endpoint

pytestmark = pytest.mark.both_loops


async def test_a_bug_in_the_data_handler_closes_the_connection_not_the_service() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    closed: asyncio.Future[str] = loop.create_future()

    def on_data(data: bytes, fds: list[int]) -> None:
        raise RuntimeError("boom")

    ep = Endpoint(loop, ours, on_data, closed.set_result, lambda: None)
    ep.start_reading()
    theirs.sendall(b"hello")
    reason = await asyncio.wait_for(closed, 5)
    assert reason == "internal error"
    assert ep.closed
    assert theirs.recv(10) == b""  # our side is really closed
    theirs.close()


async def test_fds_ride_with_their_message_in_batched_writes() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    ep = Endpoint(loop, ours, lambda d, f: None, lambda r: None, lambda: None)
    r, w = os.pipe()
    ep.queue(b"first")
    ep.queue(b"second", [os.dup(w)])
    ep.queue(b"third")
    ep.flush()
    got = b""
    fds: list[int] = []
    while len(got) < len(b"firstsecondthird"):
        msg, anc, _flags, _addr = theirs.recvmsg(100, socket.CMSG_SPACE(16))
        if anc:
            # The fd never arrives before the first byte of "second" (the kernel may
            # glue the fd-less "first" in front of it into one read).
            assert len(got) + len(msg) > len(b"first")
            for level, kind, data in anc:
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                fds.append(int.from_bytes(data[:4], "little"))
        got += msg
    assert got == b"firstsecondthird"
    assert len(fds) == 1
    os.write(fds[0], b"x")
    assert os.read(r, 1) == b"x"
    for fd in (r, w, fds[0]):
        os.close(fd)
    ep.close()
    theirs.close()
