"""SPEC §12 budgets in the pure parts: over-long names are refused before any policy
lookup, the service's name is reserved, client-chosen text in logs is bounded, and the
client's outstanding calls are matched by (peer, serial), oldest first (the cost of a
decision: test_policy_cost.py)."""

from __future__ import annotations

import itertools
import time

from xdg_containers.core.decision import (
    ACCESS_DENIED,
    BUS_NAME,
    INVALID_ARGS,
    NAME_HAS_NO_OWNER,
    SERVICE_UNKNOWN,
    Verdict,
    deny,
)
from xdg_containers.core.pending import MAX_SAME_SERIAL, PendingCalls
from xdg_containers.core.policy_filter import PolicyFilter
from xdg_containers.policy import policy_from_named_arguments
from xdg_containers.policy.tracker import NameTracker
from xdg_containers.wire.build import bus_call
from xdg_containers.wire.header import parse_header
from xdg_containers.wire.names import is_too_long, shorten

# -- over-long names at the filter ------------------------------------------------------------


def test_is_too_long_counts_bytes() -> None:
    assert not is_too_long("a." * 127 + "b")  # 255
    assert is_too_long("a." * 128)  # 256
    assert not is_too_long("\u00e9" * 127)  # 254 bytes
    assert is_too_long("\u00e9" * 200)  # 200 characters, 400 bytes


def _filter() -> PolicyFilter:
    policy = policy_from_named_arguments({"org.test.*": "own"}, {}, {})
    flt = PolicyFilter(policy, NameTracker(), frozenset({"org.freedesktop.DBus.Containers1"}))
    flt.hello_done(":1.5")
    return flt


def test_driver_calls_naming_over_long_names_get_the_bus_answer_without_lookup() -> None:
    flt = _filter()
    huge = "org.test." + "a." * 150_000 + "b"
    expected = {
        "NameHasOwner": (Verdict.ANSWER, ""),
        "GetNameOwner": (Verdict.DENY, NAME_HAS_NO_OWNER),
        "GetConnectionUnixProcessID": (Verdict.DENY, NAME_HAS_NO_OWNER),
        "ListQueuedOwners": (Verdict.DENY, NAME_HAS_NO_OWNER),
        "RequestName": (Verdict.DENY, INVALID_ARGS),
        "ReleaseName": (Verdict.DENY, INVALID_ARGS),
        "StartServiceByName": (Verdict.DENY, SERVICE_UNKNOWN),
    }
    for member, (verdict, error) in expected.items():
        msg = bus_call(7, member, arg=huge)
        start = time.perf_counter()
        decision = flt.from_client(parse_header(msg), msg)
        assert time.perf_counter() - start < 0.05, member
        assert decision is not None and decision.verdict is verdict, (member, decision)
        assert decision.error_name == error
        assert "not a valid bus name" in decision.reason and f"{len(huge)} bytes" in decision.reason
        assert len(decision.reason) < 300 and len(decision.text) < 300
    assert len(flt._level_cache) == 0  # type: ignore[attr-defined]


def test_a_255_byte_name_is_still_judged_by_the_policy() -> None:
    flt = _filter()
    name = ("org.test." + "a." * 200)[:254] + "b"
    assert len(name) == 255
    msg = bus_call(7, "NameHasOwner", arg=name)
    assert flt.from_client(parse_header(msg), msg) is None  # visible: forwarded


# -- the service's own name -------------------------------------------------------------------


def test_request_name_of_the_service_name_is_refused_whatever_the_policy() -> None:
    flt = PolicyFilter(
        policy_from_named_arguments({"org.freedesktop.*": "own"}, {}, {}),
        NameTracker(),
        frozenset({"org.freedesktop.DBus.Containers1", ":1.1"}),
    )
    flt.hello_done(":1.5")
    msg = bus_call(7, "RequestName", arg="org.freedesktop.DBus.Containers1")
    decision = flt.from_client(parse_header(msg), msg)
    assert decision is not None and decision.error_name == ACCESS_DENIED
    assert "reserved" in decision.text
    allowed = bus_call(8, "RequestName", arg="org.freedesktop.Other")
    assert flt.from_client(parse_header(allowed), allowed) is None


# -- bounded log text -------------------------------------------------------------------------


def test_shorten_bounds_and_says_the_original_length() -> None:
    assert shorten("short") == "short"
    cut = shorten("x" * 300_000)
    assert len(cut) < 230 and cut.endswith("...[300000 chars]")
    assert shorten(None) == "None"


# -- outstanding calls by (peer, serial) ------------------------------------------------------

DENIED = deny(ACCESS_DENIED, "no")


def test_a_driver_return_answers_the_oldest_driver_call_never_a_peer_call() -> None:
    calls = PendingCalls()
    calls.sent(5, ":1.9")
    calls.sent(5, BUS_NAME, DENIED)
    calls.sent(5, BUS_NAME)
    assert calls.answered(BUS_NAME, 5, False) == (BUS_NAME, DENIED)
    assert calls.answered(BUS_NAME, 5, False) == (BUS_NAME, None)
    assert calls.answered(BUS_NAME, 5, False) is None  # the peer call is not the driver's
    assert calls.answered(":1.9", 5, False) == (":1.9", None)
    assert not calls


def test_a_peer_reply_answers_only_calls_to_it_or_to_a_well_known_name() -> None:
    calls = PendingCalls()
    calls.sent(5, ":1.9")
    assert calls.answered(":1.10", 5, False) is None  # another peer
    calls.sent(5, "org.test.Talk")
    assert calls.answered(":1.10", 5, False) == ("org.test.Talk", None)
    calls.sent(6, BUS_NAME, DENIED)
    assert calls.answered(":1.9", 6, False) is None  # never a denied call's Ping
    assert calls.answered(":1.9", 5, False) == (":1.9", None)


def test_a_driver_error_answers_the_oldest_call_of_any_kind() -> None:
    calls = PendingCalls()
    calls.sent(5, "org.test.Gone")
    calls.sent(5, BUS_NAME)
    assert calls.answered(BUS_NAME, 5, True) == ("org.test.Gone", None)
    assert calls.answered(BUS_NAME, 5, False) == (BUS_NAME, None)


def test_calls_per_serial_are_bounded() -> None:
    calls = PendingCalls()
    for _ in range(MAX_SAME_SERIAL):
        assert calls.sent(5, BUS_NAME)
    assert not calls.sent(5, BUS_NAME, DENIED)  # refused: the caller sends no Ping
    assert len(calls) == 1


def test_every_reuse_sequence_gives_each_driver_reply_its_own_call() -> None:
    """The 48 sequences of the integration test, on the bookkeeping alone: two denied calls,
    one call to a peer that never answers and a ListNames, all with one serial, in every
    order; the driver answers its calls in order, and each answer goes to its own call."""
    for order in set(itertools.permutations(["deny1", "deny2", "pending", "list"])):
        for peer in (":1.5", "org.test.Talk"):
            calls = PendingCalls()
            denials = {"deny1": deny(ACCESS_DENIED, "1"), "deny2": deny(ACCESS_DENIED, "2")}
            for item in order:
                if item in denials:
                    calls.sent(9, BUS_NAME, denials[item])
                elif item == "pending":
                    calls.sent(9, peer)
                else:
                    calls.sent(9, BUS_NAME)
            for item in [i for i in order if i != "pending"]:
                got = calls.answered(BUS_NAME, 9, False)
                assert got == (BUS_NAME, denials.get(item)), (order, item, got)
            # A hidden peer's reply with the serial takes nothing but a well-known call.
            assert (calls.answered(":1.66", 9, False) is not None) == (peer == "org.test.Talk")
