"""The session core's states against every event, as a table (sans I/O: no socket, no loop).

Each row: a state (reached through the events of ``reach``), one event, the state that
follows and the kinds of action the core took (bytes toward the bus or the client,
reading paused, sockets closed, the server told...). A cell is the behaviour of today's
proxy: changing one is a behaviour change, to be made on purpose.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from tests.unit.test_core_harness import (
    BUS_OK,
    BUS_OK_FDS,
    CLIENT_AUTH,
    CLIENT_BEGIN,
    CLIENT_FD_BEGIN,
    UNIQUE,
    Harness,
    call,
    hello,
    hello_reply,
    messages,
    reply,
)
from xdg_containers.core.phase import BusPhase, Phase

STATES = [p.name for p in Phase]


def reach(state: str) -> Harness:
    """A session core in ``state`` (its bus connection attached), actions cleared."""
    h = Harness()
    h.attach_bus()
    if state in ("BEGUN", "HELLO_PENDING"):
        h.from_client(CLIENT_AUTH + CLIENT_BEGIN + (hello() if state == "HELLO_PENDING" else b""))
    elif state in ("RUNNING", "DRAINING", "CLOSED"):
        h.from_client(CLIENT_AUTH + CLIENT_BEGIN + hello())
        h.from_bus(BUS_OK + hello_reply())
    if state == "DRAINING":
        # The bus hangs up while a reply waits for a client that does not read.
        h.from_client(call(2, "Echo"))
        h.client.stuck = True
        h.from_bus(reply(2))
        h.bus_eof()
    elif state == "CLOSED":
        h.core.close()
    assert h.core.state.name == state
    h.take()
    return h


def _null_fd() -> list[int]:
    return [os.open(os.devnull, os.O_RDONLY)]


EVENTS: dict[str, Callable[[Harness], None]] = {
    "client_auth": lambda h: h.from_client(CLIENT_AUTH),
    "client_begin": lambda h: h.from_client(CLIENT_BEGIN),
    "client_hello": lambda h: h.from_client(hello(3)),
    "client_call": lambda h: h.from_client(call(9, "Echo")),
    "client_fds": lambda h: h.from_client(call(10, "Echo", fds=1), _null_fd()),
    "client_eof": lambda h: h.client_eof(),
    "bus_ok": lambda h: h.from_bus(BUS_OK),
    "bus_hello_reply": lambda h: h.from_bus(hello_reply()),
    "bus_reply": lambda h: h.from_bus(reply(9)),
    "bus_eof": lambda h: h.bus_eof(),
    # (The server stops a session's auth deadline once its Hello went: in RUNNING the
    # event never comes; the core, told, closes all the same.)
    "auth_timer": lambda h: h.core.handshake_expired(),
    "partial_timer": lambda h: h.core.partial_expired(),
}

# state, event, next state, actions (kinds, sorted; "closed": the server was told;
# pause_/read_/close_/to_: on the client or bus port)
TABLE = [
    ("AUTH", "client_auth", "AUTH", "to_client"),
    ("AUTH", "client_begin", "CLOSED", "close_bus close_client closed"),
    ("AUTH", "client_hello", "CLOSED", "close_bus close_client closed"),
    ("AUTH", "client_call", "CLOSED", "close_bus close_client closed"),
    ("AUTH", "client_fds", "CLOSED", "close_bus close_client closed"),
    ("AUTH", "client_eof", "CLOSED", "close_bus close_client closed pause_client"),
    ("AUTH", "bus_ok", "AUTH", ""),
    ("AUTH", "bus_hello_reply", "AUTH", ""),
    ("AUTH", "bus_reply", "AUTH", ""),
    ("AUTH", "bus_eof", "CLOSED", "close_bus close_client closed pause_bus"),
    ("AUTH", "auth_timer", "CLOSED", "close_bus close_client closed"),
    ("AUTH", "partial_timer", "AUTH", ""),
    ("BEGUN", "client_auth", "CLOSED", "close_bus close_client closed"),
    ("BEGUN", "client_begin", "BEGUN", ""),
    ("BEGUN", "client_hello", "HELLO_PENDING", "handshake_done to_bus"),
    ("BEGUN", "client_call", "BEGUN", "to_bus"),
    ("BEGUN", "client_fds", "BEGUN", ""),
    ("BEGUN", "client_eof", "CLOSED", "close_bus close_client closed pause_client"),
    ("BEGUN", "bus_ok", "BEGUN", ""),
    ("BEGUN", "bus_hello_reply", "BEGUN", ""),
    ("BEGUN", "bus_reply", "BEGUN", ""),
    ("BEGUN", "bus_eof", "CLOSED", "close_bus close_client closed pause_bus"),
    ("BEGUN", "auth_timer", "CLOSED", "close_bus close_client closed"),
    ("BEGUN", "partial_timer", "BEGUN", ""),
    ("HELLO_PENDING", "client_auth", "HELLO_PENDING", ""),
    ("HELLO_PENDING", "client_begin", "HELLO_PENDING", ""),
    ("HELLO_PENDING", "client_hello", "HELLO_PENDING", ""),
    ("HELLO_PENDING", "client_call", "HELLO_PENDING", ""),
    ("HELLO_PENDING", "client_fds", "HELLO_PENDING", ""),
    ("HELLO_PENDING", "client_eof", "HELLO_PENDING", "grace_timer pause_client"),
    ("HELLO_PENDING", "bus_ok", "HELLO_PENDING", ""),
    ("HELLO_PENDING", "bus_hello_reply", "HELLO_PENDING", ""),
    ("HELLO_PENDING", "bus_reply", "HELLO_PENDING", ""),
    ("HELLO_PENDING", "bus_eof", "CLOSED", "close_bus close_client closed pause_bus"),
    ("HELLO_PENDING", "auth_timer", "CLOSED", "close_bus close_client closed"),
    ("HELLO_PENDING", "partial_timer", "HELLO_PENDING", ""),
    ("RUNNING", "client_auth", "CLOSED", "close_bus close_client closed"),
    ("RUNNING", "client_begin", "RUNNING", ""),
    ("RUNNING", "client_hello", "RUNNING", "to_bus"),
    ("RUNNING", "client_call", "RUNNING", "to_bus"),
    ("RUNNING", "client_fds", "CLOSED", "close_bus close_client closed"),
    ("RUNNING", "client_eof", "CLOSED", "close_bus close_client closed pause_client"),
    ("RUNNING", "bus_ok", "CLOSED", "close_bus close_client closed"),
    ("RUNNING", "bus_hello_reply", "RUNNING", "to_client"),
    ("RUNNING", "bus_reply", "RUNNING", "to_client"),
    ("RUNNING", "bus_eof", "CLOSED", "close_bus close_client closed pause_bus"),
    ("RUNNING", "auth_timer", "CLOSED", "close_bus close_client closed"),
    ("RUNNING", "partial_timer", "RUNNING", ""),
    ("DRAINING", "client_auth", "CLOSED", "close_bus close_client closed"),
    ("DRAINING", "client_begin", "DRAINING", ""),
    ("DRAINING", "client_hello", "DRAINING", "to_bus"),
    ("DRAINING", "client_call", "DRAINING", "to_bus"),
    ("DRAINING", "client_fds", "CLOSED", "close_bus close_client closed"),
    ("DRAINING", "client_eof", "DRAINING", "pause_client"),
    ("DRAINING", "bus_ok", "CLOSED", "close_bus close_client closed"),
    ("DRAINING", "bus_hello_reply", "DRAINING", ""),
    ("DRAINING", "bus_reply", "DRAINING", ""),
    ("DRAINING", "bus_eof", "DRAINING", ""),
    ("DRAINING", "auth_timer", "CLOSED", "close_bus close_client closed"),
    ("DRAINING", "partial_timer", "DRAINING", ""),
    ("CLOSED", "client_auth", "CLOSED", ""),
    ("CLOSED", "client_begin", "CLOSED", ""),
    ("CLOSED", "client_hello", "CLOSED", ""),
    ("CLOSED", "client_call", "CLOSED", ""),
    ("CLOSED", "client_fds", "CLOSED", ""),
    ("CLOSED", "client_eof", "CLOSED", "pause_client"),
    ("CLOSED", "bus_ok", "CLOSED", ""),
    ("CLOSED", "bus_hello_reply", "CLOSED", ""),
    ("CLOSED", "bus_reply", "CLOSED", ""),
    ("CLOSED", "bus_eof", "CLOSED", "pause_bus"),
    ("CLOSED", "auth_timer", "CLOSED", ""),
    ("CLOSED", "partial_timer", "CLOSED", ""),
]


def test_the_table_has_every_state_against_every_event() -> None:
    cells = [(row[0], row[1]) for row in TABLE]
    assert len(cells) == len(set(cells))
    assert sorted(cells) == sorted((s, e) for s in STATES for e in EVENTS)


@pytest.mark.parametrize(("state", "event", "after", "actions"), TABLE)
def test_state_event(state: str, event: str, after: str, actions: str) -> None:
    h = reach(state)
    EVENTS[event](h)
    assert h.core.state.name == after
    kinds = sorted({a[0] for a in h.take()} - {"stop_io"})
    assert " ".join(kinds) == actions
    if after == "CLOSED":
        assert h.client.closed and h.bus.closed


# -- the bus side's phases, and the orders that matter ----------------------------------------


def test_bus_phases_connecting_auth_ready() -> None:
    h = Harness()
    assert (h.core.state, h.core.bus_state) == (Phase.AUTH, BusPhase.CONNECTING)
    h.from_client(CLIENT_AUTH + CLIENT_BEGIN + hello())
    # The client is done before the bus is there: its Hello waits for a connection.
    assert (h.core.state, h.core.bus_state) == (Phase.BEGUN, BusPhase.CONNECTING)
    assert not h.bus.written
    h.attach_bus()
    # AUTH, BEGIN and the Hello in one go, without waiting for the bus's OK.
    assert h.core.bus_state is BusPhase.AUTH
    assert h.core.state is Phase.HELLO_PENDING
    assert h.bus.written.startswith(b"\0AUTH EXTERNAL ")
    assert h.bus.written.endswith(b"BEGIN\r\n" + hello())
    h.from_bus(BUS_OK)
    assert h.core.bus_state is BusPhase.READY
    h.from_bus(hello_reply())
    assert h.core.state is Phase.RUNNING
    assert h.core.unique_name == UNIQUE


def test_messages_after_hello_wait_for_its_answer_and_keep_their_order() -> None:
    h = Harness()
    h.attach_bus()
    h.from_client(CLIENT_AUTH + CLIENT_BEGIN + hello() + call(2, "A") + call(3, "B"))
    assert messages(h.bus.written[h.bus.written.index(b"BEGIN\r\n") + 7 :]) == [hello()]
    h.take()
    h.from_bus(BUS_OK + hello_reply())
    order = [a[0] for a in h.take() if a[0] in ("to_client", "to_bus", "named")]
    # The client hears its name before anything it sent after Hello goes on.
    assert order == ["to_client", "named", "to_bus", "to_bus"]
    assert h.bus.written.endswith(call(2, "A") + call(3, "B"))


def test_fds_wait_for_the_bus_to_agree_then_go_with_their_message() -> None:
    h = Harness()
    h.attach_bus()
    h.from_client(CLIENT_AUTH + CLIENT_FD_BEGIN + hello())
    fd = os.open(os.devnull, os.O_RDONLY)
    h.from_client(call(2, "Fd", fds=1), [fd])
    assert fd not in h.bus.fds_written  # the bus did not agree to fd passing yet
    h.from_bus(BUS_OK_FDS + hello_reply())
    assert h.bus.fds_written == [fd]
    assert h.bus.written.endswith(call(2, "Fd", fds=1))
    os.close(fd)


def test_a_bus_refusing_fds_the_client_negotiated_closes_the_session() -> None:
    h = Harness()
    h.attach_bus()
    h.from_client(CLIENT_AUTH + CLIENT_FD_BEGIN + hello())
    h.from_bus(BUS_OK + b"ERROR\r\n")
    assert h.core.state is Phase.CLOSED


def test_a_spare_dropped_before_any_message_is_replaced_with_the_same_bytes() -> None:
    h = Harness()
    h.core._spare_addr = "/bus"
    h.core._spare_replay = []  # as the driver does when it took a spare
    h.core._bus_attached(h.bus, auth_sent=True)
    h.from_client(CLIENT_AUTH + CLIENT_BEGIN + hello())
    h.take()
    h.bus_eof()
    assert ("reconnect",) in h.take()
    assert h.core.state is Phase.HELLO_PENDING and h.core.bus_state is BusPhase.CONNECTING
    fresh = type(h.bus)("bus", h.actions)
    h.core._bus_attached(fresh)
    assert fresh.written.endswith(b"BEGIN\r\n" + hello())
    # Once only: a second hang-up closes.
    fresh.eof = True
    h.core._bus_eof()
    assert h.core.state is Phase.CLOSED


def test_half_close_waits_for_owed_replies_then_closes() -> None:
    h = reach("RUNNING")
    h.from_client(call(5, "Echo"))
    h.client_eof()
    assert h.core.state is Phase.RUNNING  # a reply is owed
    assert ("grace_timer",) in h.take()
    h.from_bus(reply(5))
    assert h.core.state is Phase.CLOSED
    assert h.client.written.endswith(reply(5))


# -- the bus side's phases against the bus's events (the client sent AUTH, BEGIN, Hello) ------


def reach_bus(state: str) -> Harness:
    """A session whose client finished its handshake and Hello, its bus side in ``state``."""
    h = Harness()
    h.from_client(CLIENT_AUTH + CLIENT_BEGIN + hello())
    if state in ("AUTH", "READY"):
        h.attach_bus()
    if state == "READY":
        h.from_bus(BUS_OK)
    assert h.core.bus_state.name == state
    h.take()
    return h


BUS_EVENTS: dict[str, Callable[[Harness], None]] = {
    "attach": lambda h: h.core._bus_attached(type(h.bus)("bus", h.actions)),
    "bus_ok": lambda h: h.from_bus(BUS_OK),
    "bus_rejected": lambda h: h.from_bus(b"REJECTED EXTERNAL\r\n"),
    "bus_hello_reply": lambda h: h.from_bus(hello_reply()),
    "bus_eof": lambda h: h.bus_eof(),
    "bus_error": lambda h: h.core._bus_error("read failed: boom"),
}
#: Cells that cannot happen: no bus socket yet, nothing comes from it; one is attached once.
IMPOSSIBLE = "-"

# bus state, event, next bus state, next state, actions
BUS_TABLE = [
    ("CONNECTING", "attach", "AUTH", "HELLO_PENDING", "handshake_done read_bus to_bus"),
    *[("CONNECTING", e, IMPOSSIBLE, IMPOSSIBLE, "") for e in BUS_EVENTS if e != "attach"],
    ("AUTH", "attach", IMPOSSIBLE, IMPOSSIBLE, ""),
    ("AUTH", "bus_ok", "READY", "HELLO_PENDING", ""),
    ("AUTH", "bus_rejected", "AUTH", "CLOSED", "close_bus close_client closed"),
    # (Bytes before the bus's OK are handshake lines to us: an unfinished one waits.)
    ("AUTH", "bus_hello_reply", "AUTH", "HELLO_PENDING", ""),
    ("AUTH", "bus_eof", "AUTH", "CLOSED", "close_bus close_client closed pause_bus"),
    ("AUTH", "bus_error", "AUTH", "CLOSED", "close_bus close_client closed"),
    ("READY", "attach", IMPOSSIBLE, IMPOSSIBLE, ""),
    ("READY", "bus_ok", "READY", "CLOSED", "close_bus close_client closed"),
    ("READY", "bus_rejected", "READY", "CLOSED", "close_bus close_client closed"),
    ("READY", "bus_hello_reply", "READY", "RUNNING", "named to_client"),
    ("READY", "bus_eof", "READY", "CLOSED", "close_bus close_client closed pause_bus"),
    ("READY", "bus_error", "READY", "CLOSED", "close_bus close_client closed"),
]


def test_the_bus_table_has_every_bus_state_against_every_bus_event() -> None:
    cells = sorted((row[0], row[1]) for row in BUS_TABLE)
    assert cells == sorted((s.name, e) for s in BusPhase for e in BUS_EVENTS)


@pytest.mark.parametrize(
    ("state", "event", "bus_after", "after", "actions"),
    [row for row in BUS_TABLE if row[2] != IMPOSSIBLE],
)
def test_bus_state_event(state: str, event: str, bus_after: str, after: str, actions: str) -> None:
    h = reach_bus(state)
    BUS_EVENTS[event](h)
    assert (h.core.bus_state.name, h.core.state.name) == (bus_after, after)
    assert " ".join(sorted({a[0] for a in h.take()} - {"stop_io"})) == actions
