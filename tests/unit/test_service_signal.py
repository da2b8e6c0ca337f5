"""The proxy drops the Containers1 service's own signals toward a confined client
(SPEC 12, issue 16 finding 5), in both filters, and nothing else."""

from __future__ import annotations

import pytest

from xdg_containers.core.basic_filter import BasicFilter
from xdg_containers.core.decision import Verdict
from xdg_containers.core.policy_filter import PolicyFilter
from xdg_containers.policy import Level, Policy
from xdg_containers.policy.tracker import NameTracker
from xdg_containers.wire.build import build_message
from xdg_containers.wire.header import SIGNAL, parse_header

NAME = "org.freedesktop.DBus.Containers1"
SERVICE = ":1.7"
# Header field codes: path, interface, member, sender.
PATH, INTERFACE, MEMBER, SENDER = 1, 2, 3, 7


def _signal(sender: str, member: str = "InterfacesAdded") -> bytes:
    return build_message(
        SIGNAL, 5,
        {PATH: "/org/freedesktop/DBus/Containers1/c3", INTERFACE: "org.example.I",
         MEMBER: member, SENDER: sender},
    )


def _filters() -> list[BasicFilter | PolicyFilter]:
    names = frozenset({NAME, SERVICE})
    policy = Policy({NAME: Level.TALK, "org.example.Other": Level.TALK}, {}, {})
    return [BasicFilter(names), PolicyFilter(policy, NameTracker(), names)]


@pytest.mark.parametrize("member", ["InterfacesAdded", "PropertiesChanged", "ServerRemoved"])
def test_the_services_signals_are_dropped(member: str) -> None:
    data = _signal(SERVICE, member)
    hdr = parse_header(data)
    for flt in _filters():
        decision = flt.from_bus(hdr, data)
        assert decision is not None and decision.verdict is Verdict.DROP, (flt, decision)


def test_other_senders_are_judged_as_before() -> None:
    basic, policy = _filters()
    data = _signal(":1.9")
    hdr = parse_header(data)
    assert basic.from_bus(hdr, data) is None
    # Not ours, not visible: the policy filter drops it for its own reason.
    decision = policy.from_bus(hdr, data)
    assert decision is not None and "service" not in decision.reason


def test_a_server_on_another_bus_knows_only_our_well_known_name() -> None:
    """There, :1.7 is someone else: its broadcasts are not ours to drop."""
    data = _signal(SERVICE)
    hdr = parse_header(data)
    assert BasicFilter(frozenset({NAME})).from_bus(hdr, data) is None
