"""Properties of the session core, checked with hypothesis on recording fakes (no I/O).

- However the same byte streams are cut into reads, both peers get the same bytes.
- A filtered client never gets a peer's reply to a call the policy denied: it gets
  the denial, in order, and exactly one answer per call.
- A bus that does not read stops the client being read before it holds more than
  max_pending_bytes_per_connection plus one message; reading resumes once it drains.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit import test_core_harness as hx
from xdg_containers.config import Limits
from xdg_containers.core.phase import Phase
from xdg_containers.core.policy_filter import PolicyFilter
from xdg_containers.policy import Level, Policy
from xdg_containers.policy.tracker import NameTracker
from xdg_containers.wire.build import method_return
from xdg_containers.wire.header import ERROR, METHOD_CALL, METHOD_RETURN, parse_header

TALK = "org.example.Talk"
HIDDEN = "org.example.Hidden"
SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
POLICY = Policy({TALK: Level.TALK}, {}, {})
PROPS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def filtered() -> hx.Harness:
    """A session under POLICY: TALK may be called, HIDDEN is not visible."""
    return hx.Harness(
        make_filter=lambda: PolicyFilter(POLICY, NameTracker(), frozenset({":1.1"}))
    )


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` split at ``points`` (fractions of its length, in thousandths)."""
    at = sorted({p * len(data) // 1000 for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(at) if b > a]


def bus_answers(stream: bytes | bytearray) -> bytes:
    """What a bus and its peers answer to the calls in ``stream`` (after the handshake)."""
    out = b""
    for n, m in enumerate(hx.messages(stream), start=100):
        hdr = parse_header(m)
        if hdr.message_type != METHOD_CALL or not hdr.expects_reply or hdr.member == "Hello":
            continue
        sender = hx.BUS if hdr.destination == hx.BUS else hx.PEER
        out += method_return(n, hdr.serial, sender, hx.UNIQUE, "", b"")
    return out


def after_begin(written: bytes | bytearray) -> bytes:
    """The messages part of what went to the bus (after our BEGIN line)."""
    return bytes(written[written.index(b"BEGIN\r\n") + 7 :])


calls_st = st.lists(st.sampled_from([TALK, HIDDEN, hx.BUS]), min_size=1, max_size=12)
cuts_st = st.lists(st.integers(0, 1000), max_size=12)


def run(dests: list[str], client_cuts: list[int], bus_cuts: list[int]) -> hx.Harness:
    """A filtered session: the client's bytes in reads cut at ``client_cuts``, the
    bus's answers at ``bus_cuts``."""
    h = filtered()
    h.attach_bus()
    stream = hx.CLIENT_AUTH + hx.CLIENT_BEGIN + hx.hello()
    for serial, dest in enumerate(dests, start=2):
        stream += hx.call(serial, "GetId" if dest == hx.BUS else "Echo", dest)
    for chunk in cut(stream, client_cuts):
        h.from_client(chunk)
        consistent(h)
    for chunk in cut(hx.BUS_OK + hx.hello_reply(), bus_cuts):
        h.from_bus(chunk)
        consistent(h)
    assert h.core.state is Phase.RUNNING
    for chunk in cut(bus_answers(after_begin(h.bus.written)), bus_cuts):
        h.from_bus(chunk)
        consistent(h)
    return h


def consistent(h: hx.Harness) -> None:
    """The named state agrees with what the core holds."""
    core = h.core
    assert (core.phase is Phase.HELLO_PENDING) == (core._hello_serial is not None)
    assert (core.phase is Phase.RUNNING) == (core.unique_name is not None)
    assert core.state is not Phase.CLOSED


@PROPS
@given(calls_st, cuts_st, cuts_st)
def test_any_cutting_of_the_streams_gives_the_same_bytes(
    dests: list[str], client_cuts: list[int], bus_cuts: list[int]
) -> None:
    whole = run(dests, [], [])
    h = run(dests, client_cuts, bus_cuts)
    assert h.bus.written == whole.bus.written
    assert h.client.written == whole.client.written
    assert h.host.messages_forwarded == whole.host.messages_forwarded


@PROPS
@given(calls_st, cuts_st, cuts_st)
def test_a_denied_call_gets_its_denial_never_a_peer_reply(
    dests: list[str], client_cuts: list[int], bus_cuts: list[int]
) -> None:
    h = run(dests, client_cuts, bus_cuts)
    got = h.client.written
    start = got.index(b"\r\n") + 2 + len(hx.hello_reply())
    answers: dict[int, list[tuple[int, str | None, str | None]]] = {}
    for m in hx.messages(got[start:]):
        hdr = parse_header(m)
        assert hdr.reply_serial is not None
        answers.setdefault(hdr.reply_serial, []).append(
            (hdr.message_type, hdr.sender, hdr.error_name)
        )
    assert sorted(answers) == list(range(2, 2 + len(dests)))
    for serial, dest in enumerate(dests, start=2):
        [(mtype, sender, error)] = answers[serial]  # exactly one answer
        if dest == HIDDEN:
            assert (mtype, error) == (ERROR, SERVICE_UNKNOWN)
            assert sender != hx.PEER
        else:
            assert (mtype, sender) == (METHOD_RETURN, hx.PEER if dest == TALK else hx.BUS)
    # Nothing to the hidden name ever reached the bus.
    assert all(
        parse_header(m).destination != HIDDEN for m in hx.messages(after_begin(h.bus.written))
    )


@PROPS
@given(
    st.lists(st.integers(0, 64 * 1024), min_size=1, max_size=40),
    st.integers(1024, 16 * 1024),
)
def test_a_bus_that_does_not_read_stops_the_client_within_its_limit(
    sizes: list[int], read_size: int
) -> None:
    max_pending = 128 * 1024
    h = hx.Harness(limits=replace(Limits(), max_pending_bytes_per_connection=max_pending))
    h.to_running()
    h.bus.stuck = True
    sent = [hx.call(n, "Echo", TALK, body="x" * size) for n, size in enumerate(sizes, 2)]
    stream = b"".join(sent)
    # Whole messages go: the last one can take the queue past the limit by its size.
    bound = max_pending + max(len(m) for m in sent)
    pos = 0
    while pos < len(stream) and h.client.reading:
        # The client's socket gives at most read_size bytes per read, only while read.
        h.from_client(stream[pos : pos + read_size])
        pos += read_size
        pending = h.bus.pending_bytes
        assert pending <= max_pending or not h.client.reading
        assert pending <= bound
    if pos < len(stream):
        assert not h.client.reading and h.bus.pending_bytes > max_pending
        h.bus.unstick()  # the bus reads it all: the client is read again
        assert h.client.reading
