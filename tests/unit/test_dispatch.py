"""DispatchingSelector: proxy sockets run inline from epoll_wait; asyncio's own fds unchanged."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator

import pytest

from xdg_containers.proxy.dispatch import DispatchingSelector, direct_selector, new_event_loop


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh dispatching loop (these tests drive it by hand)."""
    lp = new_event_loop()
    yield lp
    lp.close()


def _selector(loop: asyncio.AbstractEventLoop) -> DispatchingSelector:
    sel = direct_selector(loop)
    assert sel is not None
    return sel


def _spin(loop: asyncio.AbstractEventLoop, until: asyncio.Future[object]) -> object:
    return loop.run_until_complete(asyncio.wait_for(until, 5))


#: A connected socket pair.
Pair = tuple[socket.socket, socket.socket]


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A connected socket pair, closed after the test; the first end non-blocking (the one
    the selector watches)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _resolve(done: asyncio.Future[object]) -> None:
    """Resolve ``done`` the first time a callback gets what the test waits for."""
    if not done.done():
        done.set_result(None)


def test_plain_loops_have_no_dispatching_selector() -> None:
    lp = asyncio.new_event_loop()
    try:
        assert direct_selector(lp) is None
    finally:
        lp.close()


def test_watched_reader_runs_and_unwatch_stops_it(
    loop: asyncio.AbstractEventLoop, pair: Pair
) -> None:
    sel = _selector(loop)
    a, b = pair
    got: list[bytes] = []
    done: asyncio.Future[object] = loop.create_future()

    def on_read() -> None:
        got.append(a.recv(100))
        _resolve(done)

    sel.watch(a.fileno(), on_read, None)
    b.send(b"one")
    _spin(loop, done)
    assert got == [b"one"]
    sel.watch(a.fileno(), None, None)
    b.send(b"two")
    loop.run_until_complete(asyncio.sleep(0.05))
    assert got == [b"one"]  # unwatched: not read again
    assert a.recv(100) == b"two"


def test_writer_callback_and_switching_masks(
    loop: asyncio.AbstractEventLoop, pair: Pair
) -> None:
    sel = _selector(loop)
    a, b = pair
    calls: list[str] = []
    done: asyncio.Future[object] = loop.create_future()

    def on_write() -> None:
        calls.append("w")
        sel.watch(a.fileno(), on_read, None)  # stop asking for writability
        b.send(b"x")

    def on_read() -> None:
        calls.append("r")
        a.recv(10)
        _resolve(done)

    sel.watch(a.fileno(), None, on_write)
    _spin(loop, done)
    assert calls == ["w", "r"]
    sel.watch(a.fileno(), None, None)


def test_a_failing_callback_is_logged_and_others_still_run(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    sel = _selector(loop)
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    for s in (a1, a2):
        s.setblocking(False)
    done: asyncio.Future[object] = loop.create_future()

    def bad() -> None:
        a1.recv(10)
        raise RuntimeError("boom")

    def good() -> None:
        a2.recv(10)
        _resolve(done)

    sel.watch(a1.fileno(), bad, None)
    sel.watch(a2.fileno(), good, None)
    b1.send(b"x")
    b2.send(b"y")
    with caplog.at_level(logging.ERROR):
        _spin(loop, done)
    assert "unexpected error in a proxy socket callback" in caplog.text
    assert "boom" in caplog.text
    # The loop itself still works for asyncio's own callbacks.
    assert loop.run_until_complete(asyncio.sleep(0, result=7)) == 7
    for s in (a1, b1, a2, b2):
        s.close()


def test_a_reused_fd_number_is_registered_again(loop: asyncio.AbstractEventLoop) -> None:
    """A socket closed without unwatching leaves a stale entry; its fd's next owner works."""
    sel = _selector(loop)
    a, b = socket.socketpair()
    fd = a.fileno()
    sel.watch(fd, lambda: None, None)
    a.close()  # the kernel drops it from the epoll set; our table still has it
    c, d = socket.socketpair()
    if c.fileno() != fd:
        c, d = d, c
    assert c.fileno() == fd, "the freed fd number was not reused"
    c.setblocking(False)
    done: asyncio.Future[object] = loop.create_future()

    def on_write() -> None:
        _resolve(done)

    sel.watch(fd, None, on_write)  # different mask: modify fails, register again
    _spin(loop, done)
    sel.watch(fd, None, None)
    for s in (b, c, d):
        s.close()


def test_asyncio_readers_still_work_beside_watched_fds(loop: asyncio.AbstractEventLoop) -> None:
    sel = _selector(loop)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    for s in (a, c):
        s.setblocking(False)
    seen: list[str] = []
    done: asyncio.Future[object] = loop.create_future()

    def direct() -> None:
        a.recv(10)
        seen.append("direct")

    def via_asyncio() -> None:
        c.recv(10)
        seen.append("asyncio")
        done.set_result(None)

    sel.watch(a.fileno(), direct, None)
    loop.add_reader(c.fileno(), via_asyncio)
    b.send(b"1")
    d.send(b"2")
    _spin(loop, done)
    loop.remove_reader(c.fileno())
    sel.watch(a.fileno(), None, None)
    assert sorted(seen) == ["asyncio", "direct"]
    for s in (a, b, c, d):
        s.close()


def test_an_endpoint_on_a_reused_fd_number_is_not_deaf(loop: asyncio.AbstractEventLoop) -> None:
    """Same fd number, same mask as a stale entry: the new Endpoint still gets its data."""
    from xdg_containers.proxy.endpoint import Endpoint

    sel = _selector(loop)
    a, b = socket.socketpair()
    fd = a.fileno()
    sel.watch(fd, lambda: None, None)  # as if an owner forgot to unwatch
    a.close()
    c, d = socket.socketpair()
    if c.fileno() != fd:
        c, d = d, c
    assert c.fileno() == fd
    c.setblocking(False)
    got: asyncio.Future[bytes] = loop.create_future()
    ep = Endpoint(loop, c, lambda data, fds: got.set_result(data), lambda r: None, lambda: None)
    ep.start_reading()
    d.send(b"hello")
    assert _spin(loop, got) == b"hello"
    ep.close()
    for s in (b, d):
        s.close()


def _time_until_done(loop: asyncio.AbstractEventLoop, pair: Pair, schedule: str) -> float:
    """A direct callback gives asyncio work (a timer or a ready handle) while the loop
    waits with a long timeout: that work must run at once, not when the wait ends."""
    import time

    sel = _selector(loop)
    a, b = pair
    done: asyncio.Future[object] = loop.create_future()
    far = loop.call_later(30, lambda: None)  # the loop's wait timeout is now ~30 s

    def on_read() -> None:
        a.recv(10)
        if schedule == "timer":
            loop.call_later(0.05, done.set_result, None)
        else:
            loop.call_soon(done.set_result, None)

    sel.watch(a.fileno(), on_read, None)

    async def main() -> float:
        start = time.monotonic()
        # Let the loop block in select() before the data arrives.
        loop.call_soon(lambda: None)
        await asyncio.sleep(0)
        b.send(b"x")
        await done
        return time.monotonic() - start

    try:
        return loop.run_until_complete(main())
    finally:
        far.cancel()
        sel.watch(a.fileno(), None, None)


def test_a_timer_set_by_a_direct_callback_fires_on_time(
    loop: asyncio.AbstractEventLoop, pair: Pair
) -> None:
    assert _time_until_done(loop, pair, "timer") < 2


def test_a_handle_scheduled_by_a_direct_callback_runs_at_once(
    loop: asyncio.AbstractEventLoop, pair: Pair
) -> None:
    assert _time_until_done(loop, pair, "soon") < 2


def test_many_direct_wakeups_in_one_select_call(
    loop: asyncio.AbstractEventLoop, pair: Pair
) -> None:
    """Ping-pong through a watched socket: every message is handled although asyncio
    itself has nothing to do between them."""
    import threading

    sel = _selector(loop)
    a, b = pair
    count = 0
    done: asyncio.Future[object] = loop.create_future()

    def on_read() -> None:
        nonlocal count
        data = a.recv(100)
        count += data.count(b".")
        if count >= 200:
            sel.watch(a.fileno(), None, None)
            loop.call_soon_threadsafe(done.set_result, None)
        else:
            a.send(b"!")

    def peer() -> None:
        for _ in range(200):
            b.send(b".")
            if _ < 199:
                b.recv(1)

    sel.watch(a.fileno(), on_read, None)
    t = threading.Thread(target=peer)
    t.start()
    _spin(loop, done)
    t.join()
    assert count == 200


def test_a_later_fd_runs_after_the_others_ready_with_it(loop: asyncio.AbstractEventLoop) -> None:
    """Several fds ready in one epoll_wait: those watched with later=True run last,
    whichever became ready first (the feed yields to proxied sockets)."""
    sel = _selector(loop)
    pairs = [socket.socketpair() for _ in range(3)]
    order: list[str] = []
    done: asyncio.Future[object] = loop.create_future()

    def reader(name: str, sock: socket.socket) -> Callable[[], None]:
        def on_read() -> None:
            sock.recv(100)
            order.append(name)
            if len(order) == 3 and not done.done():
                done.set_result(None)

        return on_read

    (feed, feed_peer), (one, one_peer), (two, two_peer) = pairs
    for s in (feed, one, two):
        s.setblocking(False)
    sel.watch(feed.fileno(), reader("feed", feed), None, later=True)
    sel.watch(one.fileno(), reader("one", one), None)
    sel.watch(two.fileno(), reader("two", two), None)
    feed_peer.send(b"x")  # ready first
    one_peer.send(b"x")
    two_peer.send(b"x")
    _spin(loop, done)
    assert order[-1] == "feed" and sorted(order[:2]) == ["one", "two"]
    for s in (feed, one, two):
        sel.watch(s.fileno(), None, None)
    for pair in pairs:
        for s in pair:
            s.close()
