"""Attacks on the filter, one per known weakness of filtering proxies.

Each test acts as a hostile confined client (raw dbus-fast messages, hand-made bytes) and
checks the service holds. Servers: ``filtered`` (Filter true, a small policy) and
``unfiltered`` (no Filter: only the always-on rules apply: no nesting, no monitors, no
eavesdropping, no UpdateActivationEnvironment).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from dbus_fast import Message, MessageFlag, MessageType, Variant

from tests.integration.filter_helpers import Conn, Policy, World, barrier, wait_until, world_fixture
from tests.support.names import (
    ACCESS_DENIED,
    DRIVER,
    DRIVER_PATH,
    NAME_HAS_NO_OWNER,
    SERVER_IFACE,
    SERVICE_UNKNOWN,
)
from tests.support.processes import rss_kib
from tests.support.rawconn import RawConn
from tests.support.wire import METHOD_CALL, build_message, driver_call
from tests.unit.test_matchrule import EAVESDROP_SPELLINGS

MANAGER = "org.freedesktop.DBus.Containers1"
MANAGER_PATH = "/org/freedesktop/DBus/Containers1"

POLICY = Policy(
    levels={"org.test.Talk": "talk", "org.test.See": "see"},
    broadcasts={"org.test.Paths": ["org.test.Iface.Sig@/a/*"]},
)


@dataclass
class Setup:
    """The world, two servers and the peers."""

    world: World
    filtered: str
    filtered_path: str
    unfiltered: str
    unfiltered_path: str
    talk: Conn
    see: Conn
    hidden: Conn

    def address(self, which: str) -> str:
        return self.filtered if which == "filtered" else self.unfiltered

    def server_path(self, which: str) -> str:
        return self.filtered_path if which == "filtered" else self.unfiltered_path


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    yield from world_fixture()


@pytest.fixture(scope="module")
def setup(world: World) -> Setup:
    talk = world.peer("org.test.Talk")
    see = world.peer("org.test.See")
    hidden = world.peer("org.test.Hidden", "org.test.Hidden.Second")
    fpath, filtered = world.add_server(POLICY.named_arguments())
    upath, unfiltered = world.add_server({})
    return Setup(world, filtered, fpath, unfiltered, upath, talk, see, hidden)


@pytest.fixture(scope="module")
def clients(setup: Setup) -> dict[str, Conn]:
    """One long-lived client per server for the cheap one-call attacks."""
    return {w: setup.world.connect(setup.address(w)) for w in ("filtered", "unfiltered")}


BOTH = ["filtered", "unfiltered"]


# -- eavesdropping ------------------------------------------------------------------------------

EAVESDROP_TRUE = [
    text for text, accepted, eavesdrop in EAVESDROP_SPELLINGS if accepted and eavesdrop
]
EAVESDROP_NOT = [
    text for text, accepted, eavesdrop in EAVESDROP_SPELLINGS if accepted and not eavesdrop
]


@pytest.mark.parametrize("rule", EAVESDROP_TRUE)
def test_the_bus_itself_installs_these_eavesdrop_rules(setup: Setup, rule: str) -> None:
    """Sanity: unconfined, the real dbus-daemon accepts each spelling (so refusing matters)."""
    manager = setup.world.manager
    assert manager.add_match(rule).message_type == MessageType.METHOD_RETURN
    assert manager.driver("RemoveMatch", "s", [rule]).message_type == MessageType.METHOD_RETURN


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize("rule", EAVESDROP_TRUE)
def test_eavesdrop_in_any_spelling_is_denied(
    clients: dict[str, Conn], which: str, rule: str
) -> None:
    reply = clients[which].add_match(rule)
    assert reply.error_name == ACCESS_DENIED, (rule, reply.message_type, reply.body)


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize("rule", EAVESDROP_NOT)
def test_rules_the_bus_reads_without_eavesdrop_pass(
    clients: dict[str, Conn], which: str, rule: str
) -> None:
    """No over-blocking: what the bus installs with eavesdrop=false is forwarded."""
    reply = clients[which].add_match(rule)
    assert reply.message_type == MessageType.METHOD_RETURN, (rule, reply.error_name, reply.body)


@pytest.mark.parametrize("which", BOTH)
def test_no_unicast_traffic_reaches_a_client_that_tried_to_eavesdrop(
    setup: Setup, which: str
) -> None:
    world = setup.world
    c = world.connect(setup.address(which))
    try:
        for rule in EAVESDROP_TRUE:
            c.add_match(rule)
        setup.talk.emit("Private", destination=setup.see.unique_name)
        setup.talk.call(setup.see.unique_name, "PrivateCall")
        barrier(setup.talk, setup.see, c)
        assert c.signals("Private") == []
        assert c.calls("PrivateCall") == []
    finally:
        c.close()


# -- monitors and the activation environment ---------------------------------------------------


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize(
    ("interface", "member", "signature", "body"),
    [
        ("org.freedesktop.DBus.Monitoring", "BecomeMonitor", "asu", [[], 0]),
        ("org.freedesktop.DBus.Monitoring", "BecomeMonitor", "asu", [["type='signal'"], 0]),
        ("org.freedesktop.DBus", "BecomeMonitor", "asu", [[], 0]),
        (
            "org.freedesktop.DBus",
            "UpdateActivationEnvironment",
            "a{ss}",
            [{"LD_PRELOAD": "/tmp/evil.so"}],
        ),
    ],
)
def test_forbidden_driver_methods(
    setup: Setup, which: str, interface: str, member: str, signature: str, body: list[Any]
) -> None:
    c = setup.world.connect(setup.address(which))
    try:
        reply = c.call(DRIVER, member, signature, body, path=DRIVER_PATH, interface=interface)
        assert reply.error_name == ACCESS_DENIED, (reply.message_type, reply.body)
        # Without an interface field the bus would still dispatch it: refused too.
        reply = c.call(DRIVER, member, signature, body, path=DRIVER_PATH, interface=None)
        assert reply.error_name == ACCESS_DENIED, (reply.message_type, reply.body)
        # The connection is still a normal one afterwards (not a monitor).
        assert c.call("org.test.Talk", "Hi").message_type == MessageType.METHOD_RETURN
        assert c.driver("GetId").message_type == MessageType.METHOD_RETURN
    finally:
        c.close()


# -- no nesting --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", BOTH)
@pytest.mark.parametrize("by", ["well-known", "unique"])
@pytest.mark.parametrize("interface", ["given", "omitted"])
def test_confined_connection_cannot_manage_servers(
    setup: Setup, which: str, by: str, interface: str
) -> None:
    world = setup.world
    dest = MANAGER if by == "well-known" else world.owner(MANAGER)
    path = setup.server_path(which)
    attempts: list[tuple[str, str, str, str, list[Any]]] = [
        (MANAGER_PATH, MANAGER, "AddServer", "sssa{sv}a{sv}", ["org.evil.Nest", "a", "b", {}, {}]),
        (MANAGER_PATH, MANAGER, "StopServer", "o", [path]),
        (MANAGER_PATH, MANAGER, "StopListening", "o", [path]),
        (path, SERVER_IFACE, "Stop", "", []),
        (path, SERVER_IFACE, "StopListening", "", []),
        (
            path,
            SERVER_IFACE,
            "SetPolicy",
            "a{sv}",
            [{"org.freedesktop.XdgContainers1.Filter": Variant("b", False)}],
        ),
    ]
    c = world.connect(setup.address(which))
    try:
        for obj, iface, member, sig, body in attempts:
            reply = c.call(
                dest, member, sig, body, path=obj, interface=iface if interface == "given" else None
            )
            assert reply.error_name == ACCESS_DENIED, (member, reply.error_name, reply.body)
        # Asking about itself is allowed, with or without Filter.
        info = c.call(
            MANAGER, "GetConnectionInfo", "s", [c.unique_name], path=MANAGER_PATH, interface=MANAGER
        )
        assert info.message_type == MessageType.METHOD_RETURN, info.body
        assert info.body[0] == path
    finally:
        c.close()
    # Nothing was stopped or created.
    servers = world.manager.call(MANAGER, "ListServers", path=MANAGER_PATH, interface=MANAGER)
    assert sorted(servers.body[0]) == sorted([setup.filtered_path, setup.unfiltered_path])
    c = world.connect(setup.address(which))  # still listening
    c.close()


# -- replies: only to the caller, once ---------------------------------------------------------


def _incoming_call(
    world: World, peer: Conn, client: Conn, serial: int, member: str = "Question"
) -> Any:
    msg = Message(
        destination=client.unique_name,
        path="/",
        interface="org.test.Iface",
        member=member,
        serial=serial,
    )

    async def go() -> Message:
        return await asyncio.wait_for(peer.bus.call(msg), 10)

    fut = asyncio.run_coroutine_threadsafe(go(), world.loop.loop)
    client.wait_for(
        lambda m: m.member == member and m.sender == peer.unique_name and m.serial == serial
    )
    return fut


def _return(
    client: Conn, dest: str, serial: int, text: str, kind: MessageType = MessageType.METHOD_RETURN
) -> None:
    client.send(
        Message(
            message_type=kind,
            reply_serial=serial,
            destination=dest,
            signature="s",
            body=[text],
            error_name="org.test.Error" if kind == MessageType.ERROR else None,
        )
    )


def test_call_quoting_a_reply_serial_to_a_hidden_name(setup: Setup) -> None:
    world = setup.world
    client = world.connect(setup.filtered, auto_reply=False)
    caller = world.peer()
    try:
        pending = _incoming_call(world, caller, client, 31)
        for dest, error in [
            ("org.test.Hidden", SERVICE_UNKNOWN),
            (setup.hidden.unique_name, NAME_HAS_NO_OWNER),
        ]:
            reply = client.call(dest, "Sneak", reply_serial=31)
            assert reply.error_name == error, (dest, reply.error_name)
        barrier(client, setup.hidden)
        assert setup.hidden.calls("Sneak") == []
        _return(client, caller.unique_name, 31, "ok")
        assert pending.result(10).body == ["ok"]
    finally:
        client.close()
        caller.close()


def test_same_serial_from_two_peers(setup: Setup) -> None:
    world = setup.world
    client = world.connect(setup.filtered, auto_reply=False)
    a, b = world.peer(), world.peer()
    try:
        fa = _incoming_call(world, a, client, 9)
        fb = _incoming_call(world, b, client, 9)
        _return(client, a.unique_name, 9, "to a")
        _return(client, b.unique_name, 9, "to b", MessageType.ERROR)
        assert fa.result(10).body == ["to a"]
        err = fb.result(10)
        assert (err.error_name, err.body) == ("org.test.Error", ["to b"])
        # A second reply to the same (peer, serial) is dropped, for either peer.
        _return(client, a.unique_name, 9, "second to a")
        _return(client, b.unique_name, 9, "second to b")
        barrier(client, a, b)
        assert [m.body for m in a.replies() if m.reply_serial == 9] == [["to a"]]
        assert [m.body for m in b.replies() if m.reply_serial == 9] == [["to b"]]
    finally:
        for conn in (client, a, b):
            conn.close()


@pytest.mark.parametrize("target", ["talk", "hidden"])
def test_reply_to_a_peer_that_never_asked_is_dropped(setup: Setup, target: str) -> None:
    world = setup.world
    victim = setup.talk if target == "talk" else setup.hidden
    # Without a proxy in between the bus delivers such a reply: the proxy must drop it.
    stranger = world.peer()
    _return(stranger, victim.unique_name, 900005, "bus delivers")
    barrier(stranger, victim)
    assert [m.body for m in victim.replies() if m.reply_serial == 900005] == [["bus delivers"]]
    stranger.close()

    client = world.connect(setup.filtered, auto_reply=False)
    caller = world.peer()
    try:
        pending = _incoming_call(world, caller, client, 6)  # someone else did ask, serial 6
        for serial in (6, 7, 1, 900005):
            _return(client, victim.unique_name, serial, "forged")
            _return(client, victim.unique_name, serial, "forged", MessageType.ERROR)
        barrier(client, victim)
        assert [m for m in victim.replies() if m.body == ["forged"]] == []
        _return(client, caller.unique_name, 6, "real")
        assert pending.result(10).body == ["real"]
    finally:
        client.close()
        caller.close()


# -- broadcasts restricted by path -------------------------------------------------------------


def test_broadcast_rule_restricts_paths(setup: Setup) -> None:
    world = setup.world
    peer = world.peer("org.test.Paths")
    c = world.connect(setup.filtered)
    try:
        c.add_match("type='signal',interface='org.test.Iface'")
        for path in ["/a/b", "/ax", "/a", "/ax/b", "/", "/b/a"]:
            peer.emit("Sig", path=path)
        barrier(peer, c)
        assert [m.path for m in c.signals("Sig")] == ["/a/b", "/a"]
    finally:
        c.close()
        peer.close()


# -- repeated Hello ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", BOTH)
def test_hello_5000_times(setup: Setup, which: str) -> None:
    world = setup.world
    pid = world.service.process.pid
    raw = RawConn(setup.address(which), timeout=20)
    other = world.connect(setup.address(which))
    try:
        raw.handshake()
        name = raw.hello()
        rss_before = rss_kib(pid)
        raw.send(b"".join(driver_call(serial, "Hello") for serial in range(2, 5002)))
        raw.send(driver_call(6000, "GetId"))
        errors = 0
        while True:
            msg = raw.next_message()
            if msg.reply_serial == 6000:
                assert msg.message_type == MessageType.METHOD_RETURN
                break
            if msg.message_type == MessageType.ERROR and 2 <= (msg.reply_serial or 0) < 5002:
                assert msg.error_name == "org.freedesktop.DBus.Error.Failed", msg.error_name
                errors += 1
        assert errors == 5000
        # The connection is intact and still has its name.
        raw.send(driver_call(6001, "GetNameOwner", "s", [name]))
        assert raw.read_reply(6001).msg.body == [name]
        # Other connections are unaffected.
        assert other.call("org.test.Talk", "Hi").message_type == MessageType.METHOD_RETURN
        fresh = world.connect(setup.address(which))
        assert fresh.call("org.test.Talk", "Hi").message_type == MessageType.METHOD_RETURN
        fresh.close()
        assert world.service.process.poll() is None
        grown = rss_kib(pid) - rss_before
        assert grown < 20 * 1024, f"service RSS grew by {grown} KiB"
    finally:
        raw.close()
        other.close()


# -- hidden names never leak -------------------------------------------------------------------


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Variant):
        yield from _strings(value.value)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _leaks(msg: Message, secret: str) -> bool:
    """Whether ``secret`` (a unique name) appears in the message, as a whole name."""
    pattern = re.compile(re.escape(secret) + r"(?![0-9])")
    fields = [msg.sender, msg.destination, msg.path, msg.error_name]
    return any(pattern.search(s) for s in [*(f for f in fields if f), *_strings(msg.body)])


def test_hidden_names_never_leak(setup: Setup) -> None:
    """Queries naming the hidden well-known name, and everything the client receives while
    the hidden peer acts, never mention the peer's unique name. (Queries naming the unique
    name itself may echo it: the client wrote it; they are made on a second connection.)"""
    world = setup.world
    hidden = setup.hidden
    secret = hidden.unique_name
    c = world.connect(setup.filtered)
    probe = world.connect(setup.filtered)
    try:
        c.add_match("type='signal'")
        c.add_match("type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'")

        def drv(conn: Conn, member: str, sig: str = "", body: list[Any] | None = None) -> Message:
            return conn.call(DRIVER, member, sig, body, path=DRIVER_PATH, interface=DRIVER)

        names = drv(c, "ListNames").body[0]
        assert secret not in names and "org.test.Hidden" not in names
        for conn, n in ((c, "org.test.Hidden"), (probe, secret)):
            assert drv(conn, "NameHasOwner", "s", [n]).body == [False]
            assert drv(conn, "GetNameOwner", "s", [n]).error_name == NAME_HAS_NO_OWNER
            for q in (
                "GetConnectionUnixProcessID",
                "GetConnectionUnixUser",
                "GetConnectionCredentials",
            ):
                assert drv(conn, q, "s", [n]).error_name == SERVICE_UNKNOWN, q
            assert drv(conn, "ListQueuedOwners", "s", [n]).message_type == MessageType.ERROR
            assert drv(conn, "StartServiceByName", "su", [n, 0]).message_type == (MessageType.ERROR)
            assert conn.call(n, "Hi").message_type == MessageType.ERROR
        # The hidden peer's activity: name changes, broadcasts, a hidden peer leaving.
        hidden.request_name("org.test.Hidden.Third")
        hidden.release_name("org.test.Hidden.Third")
        hidden.emit("Sig", path="/a")
        ghost = world.peer("org.test.Ghost")
        ghost_name = ghost.unique_name
        ghost.close()
        wait_until(lambda: not world.manager.driver("NameHasOwner", "s", [ghost_name]).body[0])
        barrier(hidden, c)
        for msg in c.received:
            assert not _leaks(msg, secret), msg
            assert not _leaks(msg, ghost_name), msg

        # Our own service's queries must not reveal a hidden name's owner or existence:
        # the answer must be the one for a name nobody owns.
        def info(conn: Conn, member: str, n: str) -> Message:
            return conn.call(MANAGER, member, "s", [n], path=MANAGER_PATH, interface=MANAGER)

        for member in ("GetConnectionInfo", "GetConnectionCredentials"):
            nobody = info(c, member, "org.test.Nobody")
            for conn, n in ((c, "org.test.Hidden"), (probe, secret)):
                reply = info(conn, member, n)
                assert not (conn is c and _leaks(reply, secret)), (member, reply.body)
                assert reply.error_name == nobody.error_name, (
                    f"{member}({n}) answers {reply.error_name} {reply.body}, but "
                    f"{nobody.error_name} for a name nobody owns: the hidden name's "
                    "existence (and owner) leak"
                )
    finally:
        c.close()
        probe.close()


def test_denied_calls_are_answered(setup: Setup) -> None:
    """Denied and allowed calls pipelined: each gets exactly its answer, never silence."""
    world = setup.world
    raw = RawConn(setup.filtered)
    try:
        raw.setup()
        plan = []
        batch = b""
        for i in range(60):
            serial = 10 + i
            dest = ["org.test.Talk", "org.test.See", "org.test.Hidden"][i % 3]
            batch += _raw_call(serial, dest)
            plan.append((serial, [None, ACCESS_DENIED, SERVICE_UNKNOWN][i % 3]))
        raw.send(batch)
        got: list[tuple[int | None, str | None]] = []
        while len(got) < len(plan):
            msg = raw.next_message()
            if msg.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR):
                got.append((msg.reply_serial, msg.error_name))
                if msg.message_type == MessageType.ERROR:
                    # Like the bus's own errors, addressed to the client.
                    assert msg.sender == DRIVER, msg
                    assert msg.destination == raw.unique_name, msg
        assert sorted(got) == plan
    finally:
        raw.close()
    assert world.service.process.poll() is None


def _raw_call(serial: int, dest: str, flags: MessageFlag = MessageFlag.NONE) -> bytes:
    return build_message(
        METHOD_CALL,
        serial,
        [(1, "o", "/"), (2, "s", "org.test.Iface"), (3, "s", "Hi"), (6, "s", dest)],
        flags=int(flags),
    )
