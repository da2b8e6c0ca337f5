"""Name churn: a peer acquires and releases a policy name 2,000 times; visibility stays right.

Compared with xdg-dbus-proxy throughout. Upstream's rule (flatpak-proxy.c): a unique name
gets the level of every policy name it owned *while this client was connected* (learned
from the GetNameOwner calls at connect time and the NameOwnerChanged signals after), and
keeps it ("sticky") until it leaves the bus.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from dbus_fast import MessageType

from tests.integration.filter_helpers import Conn, Pair, Policy, World, barrier, world_fixture
from tests.support.names import ACCESS_DENIED, DRIVER, NAME_HAS_NO_OWNER, SERVICE_UNKNOWN

CHURNS = 2000
POLICY = Policy(
    levels={"org.test.Churn": "talk", "org.test.ChurnSee": "see", "org.test.Early": "talk"}
)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    yield from world_fixture()


@pytest.fixture(scope="module")
def pair(world: World) -> Pair:
    return world.pair(POLICY)


def _churn(world: World, peer: Conn, name: str, times: int) -> None:
    async def go() -> None:
        for _ in range(times):
            await peer.bus.request_name(name)
            await peer.bus.release_name(name)

    world.loop.run(go(), 120)


def _view(c: Conn, peer: Conn, name: str) -> dict[str, Any]:
    """What the client can tell about ``name`` and its (former) owner."""

    def drv(member: str, arg: str) -> Any:
        reply = c.driver(member, "s", [arg])
        return (
            reply.body[0] if reply.message_type == MessageType.METHOD_RETURN else (reply.error_name)
        )

    listed = c.driver("ListNames").body[0]
    call_name = c.call(name, "Hi")
    call_unique = c.call(peer.unique_name, "Hi")
    return {
        "has_owner(name)": drv("NameHasOwner", name),
        "owner(name)": drv("GetNameOwner", name),
        "has_owner(peer)": drv("NameHasOwner", peer.unique_name),
        "listed(name)": name in listed,
        "listed(peer)": peer.unique_name in listed,
        "call(name)": call_name.error_name or "ok",
        "call(peer)": call_unique.error_name or "ok",
    }


def test_churn_while_connected(world: World, pair: Pair) -> None:
    peer = world.peer()
    clients = {label: world.connect(address) for label, address in pair.items()}
    try:
        for c in clients.values():
            c.add_match("type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'")
        _churn(world, peer, "org.test.Churn", CHURNS)
        barrier(peer, *clients.values())
        for label, c in clients.items():
            changes = [
                tuple(m.body)
                for m in c.signals("NameOwnerChanged", sender=DRIVER)
                if m.body[0] == "org.test.Churn"
            ]
            assert (
                changes
                == [
                    ("org.test.Churn", "", peer.unique_name),
                    ("org.test.Churn", peer.unique_name, ""),
                ]
                * CHURNS
            ), label
        views = {label: _view(c, peer, "org.test.Churn") for label, c in clients.items()}
        # Released: the name is unowned; the peer keeps the talk level it had (sticky).
        assert views["ours"] == {
            "has_owner(name)": False,
            "owner(name)": NAME_HAS_NO_OWNER,
            "has_owner(peer)": True,
            "listed(name)": False,
            "listed(peer)": True,
            "call(name)": SERVICE_UNKNOWN,
            "call(peer)": "ok",
        }
        assert views["ours"] == views["xdp"]
        # Held again: visible and callable by name too.
        peer.request_name("org.test.Churn")
        barrier(peer, *clients.values())
        for label, c in clients.items():
            v = _view(c, peer, "org.test.Churn")
            assert v["owner(name)"] == peer.unique_name, label
            assert v["call(name)"] == "ok", label
        peer.release_name("org.test.Churn")
    finally:
        for c in clients.values():
            c.close()
        peer.close()


def test_churn_of_a_see_name_then_another_owner(world: World, pair: Pair) -> None:
    first, second = world.peer(), world.peer()
    clients = {label: world.connect(address) for label, address in pair.items()}
    try:
        _churn(world, first, "org.test.ChurnSee", CHURNS)
        second.request_name("org.test.ChurnSee")
        barrier(first, second, *clients.values())
        for label, c in clients.items():
            v = _view(c, second, "org.test.ChurnSee")
            assert v["owner(name)"] == second.unique_name, label
            assert v["call(name)"] == ACCESS_DENIED, label  # see, not talk
            assert v["call(peer)"] == ACCESS_DENIED, label
            old = _view(c, first, "org.test.ChurnSee")
            assert old["has_owner(peer)"] is True, label  # sticky see
            assert old["call(peer)"] == ACCESS_DENIED, label
    finally:
        for c in clients.values():
            c.close()
        first.close()
        second.close()


def test_churn_before_the_client_connected(world: World, pair: Pair) -> None:
    """A peer that owned a talk name only *before* the client connected is not sticky.

    xdg-dbus-proxy learns ownership from the moment the client connects, so the peer is
    invisible to the new client; the client must see the same through our proxy.
    """
    peer = world.peer()
    _churn(world, peer, "org.test.Early", 200)
    barrier(peer)
    views = {}
    for label, address in pair.items():
        c = world.connect(address)
        try:
            views[label] = _view(c, peer, "org.test.Early")
        finally:
            c.close()
    peer.close()
    assert views["xdp"]["has_owner(peer)"] is False
    assert views["xdp"]["call(peer)"] == NAME_HAS_NO_OWNER
    assert views["ours"] == views["xdp"], (
        "a peer that released a talk name before this client connected is still talk for it"
    )
