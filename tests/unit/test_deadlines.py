"""DeadlineQueue: keys expire a fixed delay after being added, with one timer for all."""

from __future__ import annotations

import asyncio
import logging

import pytest

from xdg_containers.io.deadlines import DeadlineQueue

DELAY = 0.05


async def _wait_for(predicate: object, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_keys_expire_in_the_order_they_were_added() -> None:
    expired: list[str] = []
    q: DeadlineQueue[str] = DeadlineQueue(asyncio.get_running_loop(), DELAY, expired.append)
    start = asyncio.get_running_loop().time()
    for key in ("a", "b", "c"):
        q.add(key)
        await asyncio.sleep(0.01)
    await _wait_for(lambda: len(expired) == 3)
    assert expired == ["a", "b", "c"]
    assert asyncio.get_running_loop().time() - start >= DELAY
    assert len(q) == 0


async def test_nothing_expires_before_its_delay() -> None:
    expired: list[str] = []
    q: DeadlineQueue[str] = DeadlineQueue(asyncio.get_running_loop(), 0.3, expired.append)
    q.add("a")
    await asyncio.sleep(0.1)
    assert expired == []
    assert "a" in q
    await _wait_for(lambda: expired == ["a"])


async def test_a_discarded_key_never_expires_and_others_still_do() -> None:
    expired: list[str] = []
    q: DeadlineQueue[str] = DeadlineQueue(asyncio.get_running_loop(), DELAY, expired.append)
    q.add("gone")
    q.add("kept")
    q.discard("gone")
    q.discard("never added")
    await _wait_for(lambda: expired == ["kept"])
    await asyncio.sleep(DELAY)
    assert expired == ["kept"]


async def test_adding_again_restarts_the_delay() -> None:
    expired: list[str] = []
    q: DeadlineQueue[str] = DeadlineQueue(asyncio.get_running_loop(), 0.2, expired.append)
    q.add("a")
    q.add("b")
    await asyncio.sleep(0.1)
    q.add("a")  # restarted: now after "b"
    await _wait_for(lambda: expired == ["b"])
    assert "a" in q
    await _wait_for(lambda: expired == ["b", "a"])


async def test_one_timer_serves_many_keys() -> None:
    loop = asyncio.get_running_loop()
    expired: list[int] = []
    q: DeadlineQueue[int] = DeadlineQueue(loop, DELAY, expired.append)
    before = len(loop._scheduled)  # type: ignore[attr-defined]
    for key in range(200):
        q.add(key)
        if key % 2:
            q.discard(key)
    assert len(loop._scheduled) == before + 1  # type: ignore[attr-defined]
    await _wait_for(lambda: len(expired) == 100)
    assert expired == list(range(0, 200, 2))


async def test_a_failing_callback_is_logged_and_the_rest_still_expire(
    caplog: pytest.LogCaptureFixture,
) -> None:
    expired: list[str] = []

    def on_expired(key: str) -> None:
        if key == "bad":
            raise RuntimeError("boom")
        expired.append(key)

    q: DeadlineQueue[str] = DeadlineQueue(asyncio.get_running_loop(), DELAY, on_expired)
    with caplog.at_level(logging.ERROR):
        q.add("bad")
        q.add("good")
        await _wait_for(lambda: expired == ["good"])
    assert "expired deadline" in caplog.text


async def test_close_drops_keys_and_timer() -> None:
    expired: list[str] = []
    q: DeadlineQueue[str] = DeadlineQueue(asyncio.get_running_loop(), DELAY, expired.append)
    q.add("a")
    q.close()
    await asyncio.sleep(DELAY * 3)
    assert expired == []
    q.add("b")  # usable again after close
    await _wait_for(lambda: expired == ["b"])
