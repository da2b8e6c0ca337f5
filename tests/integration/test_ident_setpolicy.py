"""SetPolicy on a server object: the policy of live connections changes at once (SPEC §6, §3).

Two peers own well-known names on the real bus; a confined client talks to them through a
minted socket while the launcher (the AddServer caller) replaces the server's policy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from tests.conftest import ServiceProcess, add_server, call, confined_client, connect, error, ok
from tests.integration.helpers_c1 import add_match, driver_call, name_has_owner
from tests.support.bus import PrivateBus
from tests.support.commands import gdbus_call
from tests.support.names import BROADCAST, CALL, FILTER, POLICY, SERVER_IFACE

pytestmark = pytest.mark.timeout(60)


PEER_A = "org.example.IdentPolicyA"
PEER_B = "org.example.IdentPolicyB"
PEER_PATH = "/org/example/Peer"
PEER_IFACE = "org.example.IdentPolicy"


class Peer:
    """A service on the real bus: ``Ping() -> s`` and ``Other() -> s`` answer its name;
    ``emit(n)`` broadcasts ``Tick(u n)``."""

    def __init__(self, bus: MessageBus, name: str) -> None:
        """Serve on ``bus`` under ``name`` (requested by ``start``)."""
        self.bus = bus
        self.name = name
        self.calls: list[str] = []
        bus.add_message_handler(self._handle)

    async def start(self) -> Peer:
        """Own the name."""
        assert (await self.bus.request_name(self.name)).value == 1
        return self

    def _handle(self, msg: Message) -> Message | None:
        if msg.message_type != MessageType.METHOD_CALL or msg.interface != PEER_IFACE:
            return None
        if msg.member in ("Ping", "Other"):
            self.calls.append(msg.member)
            return Message.new_method_return(msg, "s", [f"{msg.member}:{self.name}"])
        return None

    async def emit(self, n: int) -> None:
        """Broadcast Tick(n), then a round trip to the bus: the bus has routed the signal
        to every recipient before this returns."""
        await self.bus.send(Message.new_signal(PEER_PATH, PEER_IFACE, "Tick", "u", [n]))
        ok(await driver_call(self.bus, "GetId"))


@pytest.fixture
async def peers(bus: PrivateBus) -> AsyncIterator[tuple[Peer, Peer]]:
    """Two peers, A and B, on the real bus."""
    a = await Peer(await connect(bus.address), PEER_A).start()
    b = await Peer(await connect(bus.address), PEER_B).start()
    yield a, b
    a.bus.disconnect()
    b.bus.disconnect()


async def ping(client: MessageBus, name: str, member: str = "Ping") -> Message:
    """Call a peer's method through ``client``."""
    return await call(client, member, destination=name, path=PEER_PATH, interface=PEER_IFACE)


async def list_names(client: MessageBus) -> list[str]:
    """ListNames as the client sees it."""
    return list(ok(await driver_call(client, "ListNames"))[0])


async def set_policy(bus: MessageBus, path: str, named: dict[str, Variant]) -> Message:
    """SetPolicy on the server object at ``path``."""
    return await call(bus, "SetPolicy", "a{sv}", [named], path=path, interface=SERVER_IFACE)


def filtered(policy: dict[str, str] | None = None, **extra: Variant) -> dict[str, Variant]:
    """Named arguments: Filter true plus a Policy (and anything else given by key)."""
    named = {FILTER: Variant("b", True)}
    if policy is not None:
        named[POLICY] = Variant("a{ss}", policy)
    for k, v in extra.items():
        named[k] = v
    return named


async def assert_can_talk(client: MessageBus, name: str) -> None:
    """A call to ``name`` passes and reaches it; the name is visible."""
    assert ok(await ping(client, name)) == [f"Ping:{name}"]
    assert name in await list_names(client)
    assert await name_has_owner(client, name)


async def assert_hidden(client: MessageBus, name: str) -> None:
    """``name`` behaves as if nobody owned it."""
    error(await ping(client, name), "ServiceUnknown")
    assert name not in await list_names(client)
    assert not await name_has_owner(client, name)
    error(await driver_call(client, "GetNameOwner", "s", [name]), "NameHasNoOwner")


# -- tighten / loosen a live connection -------------------------------------------------------


async def test_tighten_hides_a_talk_peer_from_the_live_connection(
    service: ServiceProcess, manager_bus: MessageBus, peers: tuple[Peer, Peer]
) -> None:
    a, _b = peers
    async with confined_client(manager_bus, named=filtered({PEER_A: "talk", PEER_B: "talk"})) as (
        path,
        _,
        client,
    ):
        await assert_can_talk(client, PEER_A)
        await assert_can_talk(client, PEER_B)
        calls_before = len(a.calls)
        ok(await set_policy(manager_bus, path, filtered({PEER_B: "talk"})))
        # The very next call to A is refused as if A did not exist, and A never sees it.
        await assert_hidden(client, PEER_A)
        assert len(a.calls) == calls_before
        await assert_can_talk(client, PEER_B)


async def test_loosen_lets_a_hidden_peer_through_on_the_live_connection(
    service: ServiceProcess, manager_bus: MessageBus, peers: tuple[Peer, Peer]
) -> None:
    _a, b = peers
    async with confined_client(manager_bus, named=filtered({PEER_A: "talk"})) as (path, _, client):
        await assert_can_talk(client, PEER_A)
        await assert_hidden(client, PEER_B)
        assert b.calls == []
        ok(await set_policy(manager_bus, path, filtered({PEER_A: "talk", PEER_B: "talk"})))
        await assert_can_talk(client, PEER_B)
        assert b.calls == ["Ping"]
        await assert_can_talk(client, PEER_A)


async def test_loosening_never_reveals_past_broadcasts(
    service: ServiceProcess, manager_bus: MessageBus, peers: tuple[Peer, Peer]
) -> None:
    _a, b = peers
    path, results = await add_server(manager_bus, named=filtered({PEER_A: "talk"}))
    client = await connect(results["Address"].value)
    ticks: list[int] = []

    def on_message(msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL and msg.member == "Tick":
            ticks.append(msg.body[0])

    client.add_message_handler(on_message)
    try:
        await add_match(client, f"type='signal',interface='{PEER_IFACE}',member='Tick'")
        await b.emit(1)
        # Round trip through the proxy: anything the bus queued for the client before
        # (Tick 1) has been judged by the old policy when this reply comes back.
        ok(await driver_call(client, "GetId"))
        assert ticks == []
        ok(await set_policy(manager_bus, path, filtered({PEER_A: "talk", PEER_B: "talk"})))
        await b.emit(2)
        ok(await driver_call(client, "GetId"))
        assert ticks == [2]
    finally:
        client.disconnect()


async def test_call_rules_via_set_policy(
    service: ServiceProcess, manager_bus: MessageBus, peers: tuple[Peer, Peer]
) -> None:
    _a, b = peers
    async with confined_client(manager_bus, named=filtered({})) as (path, _, client):
        await assert_hidden(client, PEER_B)
        ok(
            await set_policy(
                manager_bus,
                path,
                filtered(**{CALL: Variant("a{sas}", {PEER_B: [f"{PEER_IFACE}.Ping@{PEER_PATH}"]})}),
            )
        )
        # A Call rule makes B visible, lets exactly the matching call through.
        assert ok(await ping(client, PEER_B)) == [f"Ping:{PEER_B}"]
        error(await ping(client, PEER_B, "Other"), "AccessDenied")
        assert PEER_B in await list_names(client)
        assert b.calls == ["Ping"]


# -- switching the filter on and off -------------------------------------------------------------


async def test_enabling_filter_applies_to_the_live_connection(
    service: ServiceProcess, manager_bus: MessageBus, peers: tuple[Peer, Peer]
) -> None:
    path, results = await add_server(manager_bus)  # unfiltered
    client = await connect(results["Address"].value)
    try:
        await assert_can_talk(client, PEER_A)
        await assert_can_talk(client, PEER_B)
        ok(await set_policy(manager_bus, path, filtered({PEER_A: "talk"})))
        await assert_hidden(client, PEER_B)
        await assert_can_talk(client, PEER_A)
        # Connections made afterwards get the new policy too.
        later = await connect(results["Address"].value)
        try:
            await assert_hidden(later, PEER_B)
            await assert_can_talk(later, PEER_A)
        finally:
            later.disconnect()
    finally:
        client.disconnect()


async def test_disabling_filter_applies_to_the_live_connection(
    service: ServiceProcess, manager_bus: MessageBus, peers: tuple[Peer, Peer]
) -> None:
    async with confined_client(manager_bus, named=filtered({PEER_A: "talk"})) as (path, _, client):
        await assert_hidden(client, PEER_B)
        # Empty named arguments: Filter defaults to false, the server is unfiltered again.
        ok(await set_policy(manager_bus, path, {}))
        await assert_can_talk(client, PEER_B)
        ok(await set_policy(manager_bus, path, filtered({PEER_A: "talk"})))
        await assert_hidden(client, PEER_B)
        ok(await set_policy(manager_bus, path, {FILTER: Variant("b", False)}))
        await assert_can_talk(client, PEER_B)


# -- invalid arguments leave the policy as it was ------------------------------------------------


async def test_invalid_set_policy_arguments(
    service: ServiceProcess, manager_bus: MessageBus, peers: tuple[Peer, Peer]
) -> None:
    async with confined_client(manager_bus, named=filtered({PEER_A: "talk"})) as (path, _, client):
        cases: list[tuple[dict[str, Variant], list[str]]] = [
            # Policy (or Call/Broadcast) without Filter=true: a silent unfiltered proxy.
            ({FILTER: Variant("b", False), POLICY: Variant("a{ss}", {PEER_B: "talk"})}, [POLICY]),
            ({POLICY: Variant("a{ss}", {PEER_B: "talk"})}, [POLICY]),
            ({CALL: Variant("a{sas}", {PEER_B: ["*"]})}, [CALL]),
            ({BROADCAST: Variant("a{sas}", {PEER_B: ["*"]})}, [BROADCAST]),
            # Unknown keys, including AddServer-only ones, are named.
            (
                {**filtered({PEER_B: "talk"}), "org.example.Bogus": Variant("b", True)},
                ["org.example.Bogus"],
            ),
            ({"StopOnDisconnect": Variant("b", False)}, ["StopOnDisconnect"]),
            # Wrong types name both.
            ({FILTER: Variant("s", "true")}, [FILTER, "'b'", "'s'"]),
            (
                {
                    FILTER: Variant("b", True),
                    POLICY: Variant("a{sv}", {PEER_B: Variant("s", "talk")}),
                },
                [POLICY, "a{ss}"],
            ),
            # A bad policy level or name.
            (filtered({PEER_B: "admin"}), ["admin"]),
        ]
        for named, mentions in cases:
            text = error(await set_policy(manager_bus, path, named), "InvalidArgs")
            for m in mentions:
                assert m in text, (named, text)
            # Nothing changed: A still talk, B still hidden.
            await assert_can_talk(client, PEER_A)
            await assert_hidden(client, PEER_B)


async def test_set_policy_signature_and_server_checks(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    path, _ = await add_server(manager_bus)
    # Wrong argument type for the method itself.
    reply = await call(manager_bus, "SetPolicy", "s", ["x"], path=path, interface=SERVER_IFACE)
    error(reply, "InvalidArgs")
    # Works from the command line too (gdbus can spell a{sv}).
    address, set_policy = service.bus_address, f"{SERVER_IFACE}.SetPolicy"
    rc, _out, err = await gdbus_call(
        address,
        path,
        set_policy,
        "{'org.freedesktop.XdgContainers1.Filter': <true>, "
        "'org.freedesktop.XdgContainers1.Policy': <{'org.example.X': 'see'}>}",
    )
    assert rc == 0, err
    policy_without_filter = "{'org.freedesktop.XdgContainers1.Policy': <{'org.example.X': 'see'}>}"
    rc, _out, err = await gdbus_call(address, path, set_policy, policy_without_filter)
    assert rc != 0 and "org.freedesktop.DBus.Error.InvalidArgs" in err, err
