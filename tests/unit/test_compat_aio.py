"""Canaries for xdg_containers/compat/aio.py: asyncio's private loop fields the dispatching
selector peeks at, and the public-API selector that replaces selectors' private fields."""

from __future__ import annotations

import asyncio
import selectors
import socket

import pytest

from xdg_containers.compat import aio
from xdg_containers.io.dispatch import DispatchingSelector, direct_selector, new_event_loop


def test_private_loop_fields_exist() -> None:
    """BaseEventLoop._ready (deque), ._scheduled (list), ._stopping (bool): if this fails,
    asyncio changed them and the service runs on the public path (slower, still correct)."""
    loop = asyncio.SelectorEventLoop(aio.EpollSelector())
    try:
        assert aio.loop_fields_problem(loop) is None, aio.loop_fields_problem(loop)
        timers = aio.scheduled_timers(loop)
        assert not aio.has_new_work(loop, timers)
        handle = loop.call_later(60, lambda: None)
        assert aio.scheduled_timers(loop) == timers + 1, "asyncio.BaseEventLoop._scheduled"
        assert aio.has_new_work(loop, timers)
        handle.cancel()
        loop.call_soon(lambda: None)
        assert aio.has_new_work(loop, aio.scheduled_timers(loop)), "asyncio.BaseEventLoop._ready"
        loop.run_until_complete(asyncio.sleep(0))
        loop.stop()
        assert aio.has_new_work(loop, aio.scheduled_timers(loop)), (
            "asyncio.BaseEventLoop._stopping")
    finally:
        loop.close()


def test_missing_field_means_public_path() -> None:
    class Other:
        _ready: list[int] = []

    assert aio.loop_fields_problem(
        Other()) == "asyncio.BaseEventLoop._ready is list, not deque"  # type: ignore[arg-type]


def test_public_env_forces_the_public_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for public in (False, True):
        if public:
            monkeypatch.setenv(aio.PUBLIC_ENV, "1")
        loop = new_event_loop()
        try:
            selector = direct_selector(loop)
            assert isinstance(selector, DispatchingSelector)
            assert selector.loop is (None if public else loop)
        finally:
            loop.close()
    plain = asyncio.new_event_loop()
    try:
        assert direct_selector(plain) is None
    finally:
        plain.close()  # left to the collector, its finalizer fails in whichever test runs gc


def test_epoll_selector_behaves_like_the_stdlib_one() -> None:
    """Same answers as selectors.EpollSelector for the calls asyncio makes."""
    a, b = socket.socketpair()
    ours, theirs = aio.EpollSelector(), selectors.EpollSelector()
    try:
        for sel in (ours, theirs):
            key = sel.register(a, selectors.EVENT_READ, "r")
            assert (key.fd, key.events, key.data) == (a.fileno(), selectors.EVENT_READ, "r")
            with pytest.raises(KeyError):
                sel.register(a.fileno(), selectors.EVENT_READ)
            with pytest.raises(ValueError):
                sel.register(b, 0)
            assert sel.select(0) == []
            b.send(b"x")
            assert [(k.fd, ev) for k, ev in sel.select(1)] == [(a.fileno(), selectors.EVENT_READ)]
            key = sel.modify(a, selectors.EVENT_READ | selectors.EVENT_WRITE, "rw")
            assert sel.get_key(a) == key and sel.get_key(a.fileno()) == key
            assert sorted(ev for _k, ev in sel.select(1)) == [3]
            assert len(sel.get_map()) == 1 and list(sel.get_map()) == [a.fileno()]
            sel.unregister(a)
            with pytest.raises(KeyError):
                sel.get_key(a)
            with pytest.raises(KeyError):
                sel.unregister(a)
            a.recv(1)
    finally:
        ours.close()
        theirs.close()
        a.close()
        b.close()
    with pytest.raises(RuntimeError):
        ours.get_key(a)


def test_asyncio_runs_on_the_public_selector() -> None:
    async def echo() -> bytes:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        with a, b:
            await loop.sock_sendall(a, b"ping")
            return await asyncio.wait_for(loop.sock_recv(b, 4), 5)

    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(aio.EpollSelector())) as r:
        assert r.run(echo()) == b"ping"
