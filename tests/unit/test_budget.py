"""BufferBudget (core/budget.py): whole-MiB accounting, pausing over the limit, resuming
under 3/4 of it, and always one holder left making progress."""

from __future__ import annotations

import pytest

from xdg_containers.core.budget import CHUNK, BufferBudget
from xdg_containers.proxy.budget import budget_for


class Holder:
    """A connection as the budget sees it."""

    def __init__(self, budget: BufferBudget, name: str) -> None:
        self.budget = budget
        self.name = name
        self.reading = True

    def hold(self, nbytes: int) -> None:
        """Report ``nbytes``; stop reading if told to (as Session._account does)."""
        if self.budget.set_held(self, nbytes):
            self.budget.paused(self)
            self.reading = False

    def budget_resume(self) -> None:
        self.reading = True

    def __repr__(self) -> str:
        return self.name


@pytest.fixture
def budget() -> BufferBudget:
    return BufferBudget(10 * CHUNK)


def test_less_than_a_chunk_is_not_counted(budget: BufferBudget) -> None:
    h = Holder(budget, "h")
    h.hold(CHUNK - 1)
    assert budget.total == 0 and budget.held(h) == 0
    h.hold(3 * CHUNK + 5)
    assert budget.total == 3 * CHUNK and budget.held(h) == 3 * CHUNK
    h.hold(0)
    assert budget.total == 0


def test_under_the_limit_nobody_stops(budget: BufferBudget) -> None:
    holders = [Holder(budget, f"h{i}") for i in range(5)]
    for h in holders:
        h.hold(2 * CHUNK)
    assert budget.total == 10 * CHUNK and not budget.over
    assert all(h.reading for h in holders)


def test_over_the_limit_holders_stop_but_one_goes_on(budget: BufferBudget) -> None:
    a, b, c = Holder(budget, "a"), Holder(budget, "b"), Holder(budget, "c")
    a.hold(4 * CHUNK)
    b.hold(4 * CHUNK)
    c.hold(3 * CHUNK)  # 11 MiB: over; c stops (a and b still read)
    assert budget.over and not c.reading
    a.hold(5 * CHUNK)  # a grows: it stops too (b still reads)
    assert not a.reading
    b.hold(5 * CHUNK)  # b is the last one reading: it may go on
    assert b.reading
    # A holder of less than a chunk (an ordinary connection) is never stopped.
    d = Holder(budget, "d")
    d.hold(CHUNK // 2)
    assert d.reading


def test_reading_resumes_under_three_quarters(budget: BufferBudget) -> None:
    a, b = Holder(budget, "a"), Holder(budget, "b")
    a.hold(6 * CHUNK)
    b.hold(6 * CHUNK)
    assert budget.over and not b.reading
    a.hold(2 * CHUNK)  # 8 MiB: under the limit, not under 7.5 MiB: still over
    assert budget.over and not b.reading
    a.hold(1 * CHUNK)  # 7 MiB
    assert not budget.over and b.reading and a.reading


def test_when_every_holder_left_is_paused_the_biggest_goes_on(budget: BufferBudget) -> None:
    a, b, c = Holder(budget, "a"), Holder(budget, "b"), Holder(budget, "c")
    a.hold(5 * CHUNK)
    b.hold(3 * CHUNK)
    c.hold(3 * CHUNK)  # over: c stops
    b.hold(4 * CHUNK)  # b stops
    assert a.reading and not b.reading and not c.reading
    budget.release(a)  # a closes: 7 MiB... under 7.5: all resume
    assert b.reading and c.reading
    b.hold(6 * CHUNK)  # 9
    c.hold(5 * CHUNK)  # 11: over, c stops
    assert not c.reading
    b.hold(7 * CHUNK)  # b stops? c is paused, b is the last reading: goes on
    assert b.reading
    budget.paused(b)  # paused anyway (e.g. a backpressure path): then b shrinks
    b.reading = False
    b.hold(4 * CHUNK)  # 9 MiB, still over, every holder paused: the biggest resumes
    assert c.reading and not b.reading


def test_a_paused_holder_that_empties_reads_again(budget: BufferBudget) -> None:
    a, b = Holder(budget, "a"), Holder(budget, "b")
    a.hold(6 * CHUNK)
    b.hold(6 * CHUNK)
    assert not b.reading
    b.hold(0)  # its queue drained: it holds nothing, nothing to stop
    assert b.reading and not budget.is_paused(b)


def test_may_grow_checks_before_the_memory_is_taken(budget: BufferBudget) -> None:
    a, b = Holder(budget, "a"), Holder(budget, "b")
    a.hold(4 * CHUNK)
    b.hold(2 * CHUNK)
    assert budget.may_grow(b, 4 * CHUNK)  # 10: fits
    assert not budget.may_grow(b, 5 * CHUNK)  # 11: no, and the budget counts as over
    assert budget.over
    budget.paused(b)
    # The last holder reading may always grow: someone must finish and free memory.
    assert budget.may_grow(a, 100 * CHUNK)


def test_one_budget_per_loop() -> None:
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        assert budget_for(loop, CHUNK) is budget_for(loop, 2 * CHUNK)
    finally:
        loop.close()
