"""SPEC §12 attacks on the policy path, one service serving many instances.

Each test runs the attacker as a client of one server and a bystander as a client of
ANOTHER server (a different AddServer on the same service), and checks the bystander is
unharmed: a thread makes GetId round trips through its server for the whole attack and
the worst one is asserted (generously: the machine is shared) and printed.

- a 300 KB dotted name in NameHasOwner/GetNameOwner & co. (policy lookups were O(n^2):
  ~9 s of a stalled service per call);
- log lines carrying client-chosen names, paths, interfaces and members (one ~300 KB
  line per denied call);
- RequestName of the service's own name from a confined client (it sat in the queue);
- one serial reused for denied calls, a pending call and ListNames (the ListNames reply
  passed unfiltered).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_fast import Message, MessageType

from tests.conftest import ServiceProcess
from tests.support.bus import PrivateBus
from tests.support.clients import run_dbus_send
from tests.support.names import (
    ACCESS_DENIED,
    EXT,
    INVALID_ARGS,
    MANAGER,
    MANAGER_PATH,
    NAME_HAS_NO_OWNER,
    SERVICE_UNKNOWN,
)
from tests.support.processes import rss_kib
from tests.support.rawconn import RawConn, RawPeer, add_server
from tests.support.wire import DRIVER, DRIVER_PATH, Received, driver_call, method_call

pytestmark = pytest.mark.timeout(120)

#: The worst bystander round trip allowed during an attack. The goal is 50 ms (measured
#: and printed); the assertion leaves room for a loaded 2-core machine. Before the fixes
#: the huge-name attack stalled everyone for seconds.
BYSTANDER_WORST = 1.0
HUGE = "org.test." + "a." * 150_000 + "b"  # 300 KB, 150 000 dots


def filtered(policy: dict[str, str]) -> dict[str, tuple[str, Any]]:
    """AddServer named arguments for a filtered server with ``policy``."""
    return {EXT + "Filter": ("b", True), EXT + "Policy": ("a{ss}", policy)}


class Bystander:
    """A well-behaved client of another server making GetId round trips in a thread."""

    def __init__(self, address: str, service_pid: int) -> None:
        """Connect and say Hello; ``start`` begins the round trips."""
        self.conn = RawConn(address, timeout=60).setup()
        self.pid = service_pid
        self.latencies: list[float] = []
        self.peak_rss_kib = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                reply = self.conn.driver("GetId")
                self.latencies.append(time.monotonic() - start)
                assert reply.message_type == MessageType.METHOD_RETURN, reply
                self.peak_rss_kib = max(self.peak_rss_kib, rss_kib(self.pid))
                time.sleep(0.002)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def __enter__(self) -> Bystander:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.latencies and self.error is None and time.monotonic() < deadline:
            time.sleep(0.005)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)
        self.conn.close()

    def worst(self, what: str) -> float:
        """The worst round trip; fails if the bystander broke. Prints the measurement."""
        assert self.error is None, f"the bystander failed: {self.error!r}"
        assert self.latencies, "the bystander made no round trip"
        worst = max(self.latencies)
        print(
            f"\n[measured] {what}: bystander worst round trip {worst * 1000:.1f} ms over "
            f"{len(self.latencies)} round trips; service peak RSS {self.peak_rss_kib} KiB"
        )
        return worst


@pytest.fixture
def manager(bus: PrivateBus) -> Iterator[RawConn]:
    """The launcher's connection on the real bus (it makes the servers)."""
    conn = RawConn(bus.address, timeout=30).setup(fds=True)
    yield conn
    conn.close()


def two_servers(
    manager: RawConn, attacker_named: dict[str, tuple[str, Any]]
) -> tuple[str, str]:
    """(attacker's address, bystander's address): two AddServers on one service."""
    _, attacker = add_server(manager, attacker_named, instance="attacker")
    _, bystander = add_server(
        manager, filtered({"org.test.Talk": "talk"}), instance="bystander"
    )
    return attacker, bystander


def assert_log_lines_bounded(service: ServiceProcess, limit: int = 4000) -> None:
    """No line of the service's log is longer than ``limit`` characters."""
    lines = service.log().splitlines()
    longest = max(lines, key=len, default="")
    assert len(longest) <= limit, f"a {len(longest)}-character log line: {longest[:300]}..."


# -- finding 1: a huge dotted name -----------------------------------------------------------


#: Driver calls naming the huge name, and what the bus itself answers for such a name
#: (dbus-daemon 1.14, measured): the proxy answers the same, before any policy lookup.
HUGE_NAME_CALLS = [
    ("NameHasOwner", "s", [HUGE], ("return", [False])),
    ("GetNameOwner", "s", [HUGE], ("error", NAME_HAS_NO_OWNER)),
    ("NameHasOwner", "s", [":" + HUGE[1:]], ("return", [False])),
    ("GetConnectionUnixProcessID", "s", [HUGE], ("error", NAME_HAS_NO_OWNER)),
    ("RequestName", "su", [HUGE, 4], ("error", INVALID_ARGS)),
    ("StartServiceByName", "su", [HUGE, 0], ("error", SERVICE_UNKNOWN)),
]


def test_huge_dotted_names_cost_linear_time_and_stall_nobody(
    service: ServiceProcess, manager: RawConn
) -> None:
    """A filtered client with wildcards in its policy (the lookup walks dot-prefixes) asks
    about a 300 KB name with 150 000 dots, again and again: each answer is the bus's for
    an invalid name, says why, comes at once, and the bystander does not notice."""
    attacker_address, bystander_address = two_servers(
        manager, filtered({"org.test.*": "see", "org.test.a.a.*": "talk"})
    )
    with Bystander(bystander_address, service.process.pid) as bystander, RawConn(
        attacker_address, timeout=60
    ).setup() as attacker:
        slowest = 0.0
        answers: list[tuple[str, Message]] = []
        for _round in range(10):
            for member, sig, args, _ in HUGE_NAME_CALLS:
                start = time.monotonic()
                reply = attacker.call(DRIVER, DRIVER_PATH, DRIVER, member, sig, args).msg
                slowest = max(slowest, time.monotonic() - start)
                answers.append((member, reply))
        worst = bystander.worst("300 KB dotted names, 60 driver calls")
        print(f"[measured] slowest answer to the attacker: {slowest * 1000:.1f} ms")
    assert worst < BYSTANDER_WORST
    assert slowest < BYSTANDER_WORST
    for (member, reply), (_, _, _, (kind, expected)) in zip(
        answers, HUGE_NAME_CALLS * 10, strict=True
    ):
        if kind == "return":
            assert reply.message_type == MessageType.METHOD_RETURN, member
            assert reply.body == expected, member
        else:
            assert reply.error_name == expected, (member, reply.error_name)
            text = str(reply.body[0])
            assert len(text) < 400, (member, len(text), text[:200])
            assert "not a valid bus name" in text and "more than 255" in text, text
    assert_log_lines_bounded(service)


def test_a_huge_destination_closes_the_connection_as_the_bus_would(
    service: ServiceProcess, manager: RawConn
) -> None:
    """dbus-daemon disconnects a client whose header names an invalid destination; the
    filtered proxy does too, before any policy lookup, and logs why once, briefly."""
    attacker_address, bystander_address = two_servers(
        manager, filtered({"org.test.*": "see"})
    )
    with Bystander(bystander_address, service.process.pid) as bystander, RawConn(
        attacker_address, timeout=60
    ).setup() as attacker:
        attacker.send(method_call(50, HUGE, "/", "org.test.I", "M"))
        assert attacker.wait_eof(30)
        worst = bystander.worst("call to a 300 KB destination")
    assert worst < BYSTANDER_WORST
    service.wait_for_log("is longer than 255 bytes")
    assert_log_lines_bounded(service)


# -- finding 13: bounded log lines ----------------------------------------------------------


def test_denials_of_huge_fields_log_bounded_lines(
    service: ServiceProcess, manager: RawConn, bus: PrivateBus
) -> None:
    """Denied calls with 300 KB paths, interfaces, members and names, through a filtered
    server that logs every message and through an unfiltered one: every log line stays
    short, and says how long the original was."""
    _, logged = add_server(
        manager,
        {**filtered({"org.test.*": "see"}), EXT + "Log": ("b", True)},
        instance="logged",
    )
    _, unfiltered = add_server(manager, {}, instance="unfiltered")
    _, bystander_address = add_server(
        manager, filtered({"org.test.Talk": "talk"}), instance="bystander"
    )
    hidden = RawPeer(bus.address, "org.hidden.Peer")
    big_path = "/" + "/".join(["p"] * 100_000)
    big_iface = "org." + ".".join(["i"] * 100_000)
    big_member = "M" * 200_000
    try:
        with Bystander(bystander_address, service.process.pid) as bystander:
            with RawConn(logged, timeout=60).setup() as a:
                for serial, msg in [
                    (100, method_call(100, "org.hidden.Peer", big_path, big_iface, big_member)),
                    (101, method_call(101, "org.test.Seen", big_path, "org.test.I", "M")),
                    (102, driver_call(102, "NameHasOwner", "s", [HUGE])),
                    (103, driver_call(103, "GetNameOwner", "s", [HUGE])),
                    (104, method_call(104, DRIVER, big_path, big_iface, big_member)),
                ]:
                    a.send(msg)
                    reply = a.read_reply(serial, timeout=30).msg
                    assert reply.message_type in (MessageType.ERROR, MessageType.METHOD_RETURN)
            with RawConn(unfiltered, timeout=60).setup() as u:
                reply = u.call(DRIVER, big_path, DRIVER, "BecomeMonitor", "asu", [[], 0]).msg
                assert reply.error_name == ACCESS_DENIED
                reply = u.call(MANAGER, big_path, MANAGER, "AddServer").msg
                assert reply.error_name == ACCESS_DENIED
            worst = bystander.worst("denials of 300 KB fields, logged")
    finally:
        hidden.stop()
    log = service.wait_for_log("BecomeMonitor")
    assert_log_lines_bounded(service)
    assert "chars]" in log  # shortened, with the original length
    assert worst < BYSTANDER_WORST


# -- finding 8: the service's own name ------------------------------------------------------


@pytest.mark.parametrize(
    "named",
    [
        {},
        filtered({"org.freedesktop.DBus.*": "own"}),
        filtered({"org.freedesktop.*": "own"}),
    ],
    ids=["unfiltered", "filtered-own-DBus.*", "filtered-own-freedesktop.*"],
)
def test_no_confined_client_may_own_or_queue_for_the_service_name(
    service: ServiceProcess, manager: RawConn, named: dict[str, tuple[str, Any]]
) -> None:
    """Real clients (dbus-python staying connected, dbus-send) ask RequestName for
    org.freedesktop.DBus.Containers1 with every flag combination: AccessDenied saying the
    name is reserved; the bus's queue for the name holds the service alone while the
    attacker is connected; a bystander on another server still asks the service about
    itself."""
    import dbus
    import dbus.bus

    attacker_address, bystander_address = two_servers(manager, named)
    service_owner = manager.driver("GetNameOwner", "s", [MANAGER]).body[0]
    with Bystander(bystander_address, service.process.pid) as bystander:
        conn = dbus.bus.BusConnection(attacker_address)
        try:
            for flags in (0, 1, 2, 3, 4, 5, 6, 7):
                with pytest.raises(dbus.exceptions.DBusException) as info:
                    conn.call_blocking(
                        DRIVER, DRIVER_PATH, DRIVER, "RequestName", "su", [MANAGER, flags]
                    )
                assert info.value.get_dbus_name() == ACCESS_DENIED, (flags, info.value)
                assert "reserved" in str(info.value), info.value
            queued = manager.driver("ListQueuedOwners", "s", [MANAGER])
            assert queued.body == [[service_owner]], queued.body
            # Harmless and still allowed: releasing it (the client is no owner).
            released = conn.call_blocking(
                DRIVER, DRIVER_PATH, DRIVER, "ReleaseName", "s", [MANAGER]
            )
            assert int(released) == 3  # DBUS_RELEASE_NAME_REPLY_NOT_OWNER
        finally:
            conn.close()
        outcome = run_dbus_send(
            attacker_address, DRIVER, DRIVER_PATH, DRIVER, "RequestName", "su", [MANAGER, 0]
        )
        assert outcome == ("error", ACCESS_DENIED), outcome
        with RawConn(bystander_address, timeout=30).setup() as other:
            info_reply = other.call(
                MANAGER, MANAGER_PATH, MANAGER, "GetConnectionInfo", "s", [other.unique_name]
            ).msg
            assert info_reply.message_type == MessageType.METHOD_RETURN, info_reply
        worst = bystander.worst("RequestName of the service's name")
    assert worst < BYSTANDER_WORST
    assert manager.driver("ListQueuedOwners", "s", [MANAGER]).body == [[service_owner]]


# -- finding 4: one serial reused -----------------------------------------------------------

SERIAL = 77
BARRIER = 5000


def _sequences() -> list[tuple[tuple[str, ...], str, str]]:
    """The 48 sequences: 2 denied calls, 1 pending call, 1 ListNames, all one serial, in
    every order (12), the pending call to the client's own name or to a talk peer that
    never answers (2), the denials a call to a hidden name or NameHasOwner of it (2)."""
    orders = sorted(set(itertools.permutations(["deny", "deny", "pending", "list"])))
    return [
        (order, pending, denial)
        for order in orders
        for pending in ("own", "talk")
        for denial in ("call-hidden", "hasowner-hidden")
    ]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)


def test_a_reused_serial_never_turns_a_filtered_reply_into_an_unfiltered_one(
    service: ServiceProcess, manager: RawConn, bus: PrivateBus
) -> None:
    """A raw client replays all 48 sequences on fresh connections: no hidden name ever
    appears in a reply, and each driver-bound call gets its own answer, in order."""
    attacker_address, bystander_address = two_servers(
        manager, filtered({"org.test.Talk": "talk"})
    )
    talk = RawPeer(bus.address, "org.test.Talk", lambda peer, call: None)  # never answers
    hidden = RawPeer(bus.address, "org.test.Hidden")
    hidden_names = {"org.test.Hidden", hidden.conn.unique_name, MANAGER, manager.unique_name}
    leaks: list[str] = []
    wrong: list[str] = []
    try:
        with Bystander(bystander_address, service.process.pid) as bystander:
            for order, pending, denial in _sequences():
                with RawConn(attacker_address, timeout=30).setup() as c:
                    visible = {DRIVER, "org.test.Talk", talk.conn.unique_name, c.unique_name}
                    out = b""
                    expected: list[tuple[str, Any]] = []
                    for item in order:
                        if item == "deny" and denial == "call-hidden":
                            out += method_call(SERIAL, "org.test.Hidden", "/", "org.x.I", "M")
                            expected.append(("error", SERVICE_UNKNOWN))
                        elif item == "deny":
                            out += driver_call(SERIAL, "NameHasOwner", "s", ["org.test.Hidden"])
                            expected.append(("return", [False]))
                        elif item == "pending":
                            dest = c.unique_name if pending == "own" else "org.test.Talk"
                            out += method_call(SERIAL, dest, "/", "org.x.I", "Pending")
                        else:
                            out += driver_call(SERIAL, "ListNames")
                            expected.append(("names", None))
                    c.send(out + driver_call(BARRIER, "GetId"))
                    got: list[Message] = []
                    while True:
                        r: Received | None = c.read_message(timeout=30)
                        assert r is not None, "the attacker's connection closed"
                        if r.msg.reply_serial == BARRIER:
                            break
                        if r.msg.message_type == MessageType.METHOD_CALL:
                            continue  # its own pending call, delivered to it
                        got.append(r.msg)
                    label = f"{order} pending={pending} denial={denial}"
                    for m in got:
                        if m.message_type == MessageType.METHOD_RETURN:
                            shown = set(_strings(m.body))
                            if shown & hidden_names or (
                                m.signature == "as" and not shown <= visible
                            ):
                                leaks.append(f"{label}: {sorted(shown)}")
                    kinds = [
                        ("error", m.error_name)
                        if m.message_type == MessageType.ERROR
                        else ("names", None)
                        if m.signature == "as"
                        else ("return", m.body)
                        for m in got
                        if m.reply_serial == SERIAL
                    ]
                    if kinds != expected:
                        wrong.append(f"{label}: {kinds}")
            worst = bystander.worst("48 serial-reuse sequences")
    finally:
        talk.stop()
        hidden.stop()
    assert leaks == [], f"{len(leaks)} of 48 sequences leaked hidden names: {leaks[:3]}"
    assert wrong == [], f"{len(wrong)} of 48 sequences got other answers: {wrong[:3]}"
    assert worst < BYSTANDER_WORST
