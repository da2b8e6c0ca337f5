"""PolicyFilter set-up: subscriptions ride with Hello once; the pass cache is the policy's."""

from __future__ import annotations

from xdg_containers.core.basic_filter import BasicFilter
from xdg_containers.core.policy_filter import PolicyFilter
from xdg_containers.policy import Level, Policy
from xdg_containers.policy.tracker import NameTracker
from xdg_containers.wire.header import parse_header


def _policy() -> Policy:
    return Policy({"org.example.Talk": Level.TALK, "org.example.ns": Level.SEE}, {}, {})


def _filter(policy: Policy) -> PolicyFilter:
    return PolicyFilter(policy, NameTracker(), frozenset({"org.freedesktop.DBus.Containers1"}))


def test_subscriptions_are_given_once_with_the_hello() -> None:
    flt = _filter(_policy())
    sent = flt.hello_sent()
    assert len(sent) == 2 and all(b"AddMatch" in m for m in sent)
    assert all(parse_header(m).flags & 0x1 for m in sent)  # NO_REPLY_EXPECTED
    assert flt.hello_done(":1.5") == []  # not twice
    assert flt.own_name == ":1.5"


def test_a_filter_that_missed_the_hello_subscribes_when_it_learns_the_name() -> None:
    # SetPolicy replacing an unfiltered connection's filter: no hello_sent happened.
    flt = _filter(_policy())
    assert len(flt.hello_done(":1.5")) == 2


def test_connections_under_one_policy_share_their_passes_and_a_new_policy_has_none() -> None:
    policy = _policy()
    a, b = _filter(policy), _filter(policy)
    a.call_passes[b"fields"] = "org.example.Talk"
    assert b.call_passes is a.call_passes is policy.call_passes
    a.update_policy(Policy({}, {}, {}))
    assert a.call_passes == {}  # nothing judged under the old policy is reused
    assert b.call_passes == {b"fields": "org.example.Talk"}


def test_basic_filters_share_the_dict_they_are_given() -> None:
    shared: dict[bytes, str] = {}
    names = frozenset({"org.freedesktop.DBus.Containers1"})
    assert BasicFilter(names, shared).call_passes is BasicFilter(names, shared).call_passes
    assert BasicFilter(names).call_passes is not BasicFilter(names).call_passes


def test_a_policy_change_between_hello_and_its_reply_subscribes_the_new_names() -> None:
    flt = _filter(_policy())
    assert len(flt.hello_sent()) == 2
    new = flt.update_policy(Policy({"org.example.Other": Level.TALK}, {}, {}))
    assert len(new) == 1 and b"org.example.Other" in new[0]
    assert flt.hello_done(":1.5") == []  # everything needed is subscribed already


def test_a_policy_change_before_the_hello_waits_for_it() -> None:
    flt = _filter(_policy())
    assert flt.update_policy(Policy({"org.example.Other": Level.TALK}, {}, {})) == []
    sent = flt.hello_sent()
    assert len(sent) == 1 and b"org.example.Other" in sent[0]


def test_a_policy_change_after_the_hello_subscribes_only_what_is_new() -> None:
    flt = _filter(_policy())
    flt.hello_sent()
    flt.hello_done(":1.5")
    assert flt.update_policy(_policy()) == []
    grown = Policy({"org.example.Talk": Level.TALK, "org.example.More": Level.SEE}, {}, {})
    new = flt.update_policy(grown)
    assert len(new) == 1 and b"org.example.More" in new[0]
