"""Tests for xdg_containers.policy: levels, wildcards and Call/Broadcast rules (xdg-dbus-proxy)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xdg_containers.policy import (
    BROADCAST_ARGUMENT,
    CALL_ARGUMENT,
    POLICY_ARGUMENT,
    Level,
    Policy,
    PolicyError,
    Rule,
    max_level,
    parse_rule,
    policy_from_named_arguments,
)
from xdg_containers.policy import rules as rules_module


def make_policy(
    policy: Mapping[str, str] | None = None,
    call: Mapping[str, Sequence[str]] | None = None,
    broadcast: Mapping[str, Sequence[str]] | None = None,
) -> Policy:
    return policy_from_named_arguments(policy or {}, call or {}, broadcast or {})


# --- rules ------------------------------------------------------------------------------

PARSED_RULES = [
    ("", Rule(None, None, None, False)),
    ("*", Rule(None, None, None, False)),
    ("org.foo.*", Rule("org.foo", None, None, False)),
    ("org.foo.Bar", Rule("org.foo", "Bar", None, False)),  # split at the last dot
    ("org.freedesktop.portal.Desktop", Rule("org.freedesktop.portal", "Desktop", None, False)),
    ("org.foo.Bar.*", Rule("org.foo.Bar", None, None, False)),
    ("@/a", Rule(None, None, "/a", False)),
    ("@/", Rule(None, None, "/", False)),
    ("@/a/b/*", Rule(None, None, "/a/b", True)),
    ("@/*", Rule(None, None, "/", True)),
    ("*@/a/*", Rule(None, None, "/a", True)),
    ("org.foo.Bar@/x", Rule("org.foo", "Bar", "/x", False)),
    ("org.foo.*@/org/foo/*", Rule("org.foo", None, "/org/foo", True)),
]


@pytest.mark.parametrize(("text", "rule"), PARSED_RULES)
def test_parse_rule(text: str, rule: Rule) -> None:
    assert parse_rule(text) == rule


@pytest.mark.parametrize(
    "text",
    [
        "org",  # interface "org" is not an interface name ...
        "Foo",  # ... and a bare member has no interface
        "org.foo",  # interface "org", member "foo"
        "org.foo.",
        "org..foo.*",
        "*foo",
        "**",
        "*.*",
        ".*",
        "org.foo.1Bar",
        "org.foo-bar.Baz",
        "org.foo.Bar-x",
        "@",
        "@a",
        "@/a/",
        "@//*",
        "@/a/*/b",
        "@/a*",
        "@/a/**",
        "org.foo.Bar@/a@/b",
        "org.foo.Bar@",
        " org.foo.Bar",
        "org.foo.Bar ",
    ],
)
def test_parse_rule_rejects(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_rule(text)


RULE_MATCHES = [
    # rule, (interface, member, path), expected
    ("*", ("a.b", "M", "/x"), True),
    ("*", (None, "M", "/x"), True),
    ("", (None, None, None), True),
    ("org.foo.*", ("org.foo", "M", "/"), True),
    ("org.foo.*", ("org.foo.Sub", "M", "/"), False),
    ("org.foo.*", (None, "M", "/"), False),  # a call without an interface
    ("org.foo.Bar", ("org.foo", "Bar", "/"), True),
    ("org.foo.Bar", ("org.foo", "Baz", "/"), False),
    ("@/a", ("x.y", "M", "/a"), True),
    ("@/a", ("x.y", "M", "/a/b"), False),
    ("@/a/*", ("x.y", "M", "/a"), True),
    ("@/a/*", ("x.y", "M", "/a/b"), True),
    ("@/a/*", ("x.y", "M", "/a/b/c"), True),
    ("@/a/*", ("x.y", "M", "/ab"), False),
    ("@/a/*", ("x.y", "M", "/"), False),
    ("@/a/*", ("x.y", "M", None), False),
    ("@/*", ("x.y", "M", "/"), True),
    ("@/*", ("x.y", "M", "/any/where"), True),
    ("@/", ("x.y", "M", "/"), True),
    ("@/", ("x.y", "M", "/a"), False),
    ("org.foo.Bar@/a/*", ("org.foo", "Bar", "/a/b"), True),
    ("org.foo.Bar@/a/*", ("org.foo", "Bar", "/b"), False),
    ("org.foo.Bar@/a/*", ("org.foo", "Baz", "/a"), False),
]


@pytest.mark.parametrize(("text", "message", "expected"), RULE_MATCHES)
def test_rule_matches(
    text: str, message: tuple[str | None, str | None, str | None], expected: bool
) -> None:
    assert parse_rule(text).matches(*message) is expected


# --- levels -----------------------------------------------------------------------------


def test_level_order_and_max() -> None:
    assert Level.NONE < Level.SEE < Level.TALK < Level.OWN
    assert max_level(Level.SEE, Level.TALK) is Level.TALK
    assert max_level(Level.OWN, Level.NONE) is Level.OWN
    assert max_level(Level.SEE, Level.SEE) is Level.SEE


WILDCARD_LEVELS = [
    ("org.foo", Level.TALK),
    ("org.foo.bar", Level.TALK),
    ("org.foo.bar.baz", Level.TALK),
    ("org.foobar", Level.NONE),
    ("org.fo", Level.NONE),
    ("org", Level.NONE),
    ("net.foo", Level.NONE),
    (":1.2", Level.NONE),
    ("", Level.NONE),
]


@pytest.mark.parametrize(("name", "level"), WILDCARD_LEVELS)
def test_wildcard_boundaries(name: str, level: Level) -> None:
    assert make_policy({"org.foo.*": "talk"}).level(name) is level


def test_exact_name_does_not_cover_children() -> None:
    policy = make_policy({"org.foo": "own"})
    assert policy.level("org.foo") is Level.OWN
    assert policy.level("org.foo.bar") is Level.NONE


def test_levels_add_up_highest_wins() -> None:
    policy = make_policy(
        {"org.foo": "see", "org.foo.*": "talk", "org.foo.bar.*": "own", "org.foo.see": "see"}
    )
    assert policy.level("org.foo") is Level.TALK
    assert policy.level("org.foo.see") is Level.TALK
    assert policy.level("org.foo.bar") is Level.OWN
    assert policy.level("org.foo.bar.baz") is Level.OWN
    assert policy.level("org") is Level.NONE


def test_rules_make_a_name_visible_but_grant_nothing_else() -> None:
    policy = make_policy(call={"org.call": ["*"]}, broadcast={"org.bcast.*": ["*"]})
    assert policy.level("org.call") is Level.SEE
    assert policy.level("org.bcast") is Level.SEE
    assert policy.level("org.bcast.x") is Level.SEE
    assert policy.has_call_rules("org.call")
    assert not policy.has_call_rules("org.bcast")
    assert policy.has_broadcast_rules("org.bcast.x")
    # As xdg-dbus-proxy (every rule counts as TALK there): StartServiceByName may pass.
    assert policy.start_service_allowed("org.call")
    assert policy.start_service_allowed("org.bcast")
    assert not policy.start_service_allowed("org.other")


def test_rules_do_not_lower_a_level() -> None:
    policy = make_policy({"org.foo": "own"}, call={"org.foo": ["org.foo.Bar"]})
    assert policy.level("org.foo") is Level.OWN


def test_start_service_needs_talk_without_rules() -> None:
    policy = make_policy({"org.see": "see", "org.talk": "talk", "org.own": "own"})
    assert not policy.start_service_allowed("org.see")
    assert policy.start_service_allowed("org.talk")
    assert policy.start_service_allowed("org.own")


# --- calls and broadcasts ----------------------------------------------------------------


def test_talk_allows_every_call_and_broadcast() -> None:
    policy = make_policy({"org.talk": "talk", "org.own.*": "own", "org.see": "see"})
    for name in ("org.talk", "org.own", "org.own.sub"):
        assert policy.call_allowed(name, None, "Anything", "/x")
        assert policy.broadcast_allowed(name, "a.b", "Sig", "/")
    assert not policy.call_allowed("org.see", "a.b", "M", "/")
    assert not policy.broadcast_allowed("org.see", "a.b", "M", "/")
    assert not policy.call_allowed("org.unknown", "a.b", "M", "/")


def test_call_rules_let_exactly_the_matching_calls_through() -> None:
    policy = make_policy(
        {"org.foo": "see"},
        call={"org.foo": ["org.foo.Iface.Get@/org/foo/*", "org.foo.Other.*"]},
    )
    assert policy.call_allowed("org.foo", "org.foo.Iface", "Get", "/org/foo")
    assert policy.call_allowed("org.foo", "org.foo.Iface", "Get", "/org/foo/x")
    assert not policy.call_allowed("org.foo", "org.foo.Iface", "Get", "/org/foox")
    assert not policy.call_allowed("org.foo", "org.foo.Iface", "Set", "/org/foo")
    assert policy.call_allowed("org.foo", "org.foo.Other", "Whatever", "/any")
    assert not policy.call_allowed("org.foo", None, "Whatever", "/any")
    # Call rules never let broadcasts through.
    assert not policy.broadcast_allowed("org.foo", "org.foo.Other", "Whatever", "/any")


def test_broadcast_rules_really_restrict() -> None:
    policy = make_policy(broadcast={"org.foo.*": ["org.foo.Iface.Changed", "@/org/foo/*"]})
    assert policy.broadcast_allowed("org.foo.x", "org.foo.Iface", "Changed", "/")
    assert not policy.broadcast_allowed("org.foo.x", "org.foo.Iface", "Other", "/")
    assert policy.broadcast_allowed("org.foo", "a.b", "Any", "/org/foo/bar")
    assert not policy.broadcast_allowed("org.foo", "a.b", "Any", "/org/bar")
    assert not policy.call_allowed("org.foo", "org.foo.Iface", "Changed", "/")


def test_wildcard_and_exact_rules_combine() -> None:
    policy = make_policy(call={"org.foo.*": ["a.b.One"], "org.foo.bar": ["a.b.Two"]})
    assert policy.call_allowed("org.foo.bar", "a.b", "One", "/")
    assert policy.call_allowed("org.foo.bar", "a.b", "Two", "/")
    assert not policy.call_allowed("org.foo.baz", "a.b", "Two", "/")
    assert not policy.call_allowed("org.foobar", "a.b", "One", "/")


def test_unique_names_get_nothing_directly() -> None:
    policy = make_policy({"org.foo.*": "own"}, call={"org.bar": ["*"]})
    assert policy.level(":1.5") is Level.NONE
    assert not policy.call_allowed(":1.5", "a.b", "M", "/")
    assert not policy.has_call_rules(":1.5")


def test_names_owned_by_a_peer_merge() -> None:
    policy = make_policy(call={"org.a": ["a.b.One"]}, broadcast={"org.b": ["a.b.Sig"]})
    owned = [":1.9", "org.a", "org.b"]
    assert policy.any_call_allowed(owned, "a.b", "One", "/")
    assert not policy.any_call_allowed(owned, "a.b", "Sig", "/")
    assert policy.any_broadcast_allowed(owned, "a.b", "Sig", "/")
    assert not policy.any_broadcast_allowed([":1.9"], "a.b", "Sig", "/")


def test_tracked_names() -> None:
    policy = make_policy(
        {"org.a": "see", "org.b.*": "talk"},
        call={"org.c": ["*"], "org.d.*": ["*"]},
        broadcast={"org.e": ["*"], "org.empty": []},
    )
    assert policy.names_exact == frozenset({"org.a", "org.c", "org.e"})
    assert policy.wildcard_prefixes == frozenset({"org.b", "org.d"})


def test_cache_is_bounded() -> None:
    policy = make_policy({"org.foo.*": "talk"})
    for i in range(rules_module._CACHE_MAX + 10):
        policy.level(f"org.x{i}.y")
    assert len(policy._cache) <= rules_module._CACHE_MAX
    assert policy.level("org.foo.bar") is Level.TALK


def test_policy_constructor_takes_levels_and_rules() -> None:
    policy = Policy(
        {"org.a.*": Level.OWN},
        {"org.b": [parse_rule("a.b.M")]},
        {"org.c": [parse_rule("@/x/*")]},
    )
    assert policy.level("org.a.z") is Level.OWN
    assert policy.call_allowed("org.b", "a.b", "M", "/")
    assert policy.broadcast_allowed("org.c", "i.j", "S", "/x/y")
    with pytest.raises(PolicyError):
        Policy({":1.2": Level.SEE}, {}, {})


# --- validation of named arguments --------------------------------------------------------


def test_invalid_level_message() -> None:
    with pytest.raises(PolicyError) as info:
        make_policy({"org.foo": "speak"})
    assert str(info.value) == (
        "org.freedesktop.XdgContainers1.Policy: invalid level 'speak' for 'org.foo' "
        "(expected see, talk or own)"
    )


@pytest.mark.parametrize("word", ["SEE", "Talk", "none", "", " own", "own "])
def test_levels_are_exact_words(word: str) -> None:
    with pytest.raises(PolicyError, match="invalid level"):
        make_policy({"org.foo": word})


BAD_KEYS = [
    ":1.2",
    ":1.*",
    "org",
    "org.*",  # upstream refuses it too: the prefix must be a valid name
    "*",
    ".*",
    "org.foo.",
    "org..foo",
    "1org.foo",
    "org.foo.**",
    "org.*.foo",
    "org.foo*",
    "",
    "org.fóo",
    "a." + "b" * 254,
]


@pytest.mark.parametrize("key", BAD_KEYS)
@pytest.mark.parametrize("argument", [POLICY_ARGUMENT, CALL_ARGUMENT, BROADCAST_ARGUMENT])
def test_invalid_keys_are_refused_naming_the_argument(key: str, argument: str) -> None:
    with pytest.raises(PolicyError) as info:
        if argument == POLICY_ARGUMENT:
            make_policy({key: "see"})
        elif argument == CALL_ARGUMENT:
            make_policy(call={key: ["*"]})
        else:
            make_policy(broadcast={key: ["*"]})
    assert str(info.value).startswith(argument + ": ")
    assert repr(key)[:40] in str(info.value)


def test_unique_name_key_explains_itself() -> None:
    with pytest.raises(PolicyError, match=r"unique name ':1\.2' cannot be a policy key"):
        make_policy({":1.2": "talk"})


@pytest.mark.parametrize("key", ["org.foo", "org.foo.*", "org.foo-bar.Baz_2", "_a.b.*"])
def test_valid_keys(key: str) -> None:
    make_policy({key: "see"}, call={key: ["*"]}, broadcast={key: ["*"]})


def test_invalid_rule_message_names_argument_entry_and_problem() -> None:
    with pytest.raises(PolicyError) as info:
        make_policy(call={"org.foo": ["*", "org.foo@/bad/"]})
    message = str(info.value)
    assert message.startswith(
        "org.freedesktop.XdgContainers1.Call: invalid rule 'org.foo@/bad/' for 'org.foo': "
    )
    assert "'/bad/'" in message
    with pytest.raises(PolicyError, match=r"^org\.freedesktop\.XdgContainers1\.Broadcast: "):
        make_policy(broadcast={"org.foo": ["Member"]})


def test_rules_must_be_a_list_of_strings() -> None:
    with pytest.raises(PolicyError, match="must be a list of strings"):
        make_policy(call={"org.foo": "*"})
    with pytest.raises(PolicyError, match="is not a string"):
        make_policy(call={"org.foo": [3]})  # type: ignore[list-item]


def test_long_entries_are_shortened_in_messages() -> None:
    with pytest.raises(PolicyError) as info:
        make_policy({"org.foo": "x" * 10_000})
    assert len(str(info.value)) < 400


# --- properties -------------------------------------------------------------------------

_element = st.builds(
    lambda a, b: a + b, st.sampled_from("abcXY_-"), st.text(alphabet="abcXY_-019", max_size=4)
)
_name = st.lists(_element, min_size=2, max_size=4).map(".".join)
_iface_element = st.builds(
    lambda a, b: a + b, st.sampled_from("abcXY_"), st.text(alphabet="abcXY_019", max_size=4)
)
_iface = st.lists(_iface_element, min_size=2, max_size=4).map(".".join)
_path = st.lists(st.text(alphabet="ab_1", min_size=1, max_size=3), max_size=3).map(
    lambda parts: "/" + "/".join(parts)
)


@given(_name, _name)
def test_wildcard_boundary_property(prefix: str, name: str) -> None:
    policy = make_policy({prefix + ".*": "talk"})
    covered = name == prefix or name.startswith(prefix + ".")
    assert (policy.level(name) is Level.TALK) is covered
    assert policy.call_allowed(name, None, "M", "/") is covered
    # Names that merely share a string prefix are never covered.
    assert policy.level(prefix + "x") is Level.NONE


@given(
    st.none() | _iface,
    st.none() | _iface_element,
    st.none() | _path,
    st.booleans(),
)
def test_rule_round_trips(
    interface: str | None, member: str | None, path: str | None, prefix: bool
) -> None:
    if interface is None:
        member = None
    if path is None:
        prefix = False
    rule = Rule(interface, member, path, prefix)
    assert parse_rule(rule.to_text()) == rule


@given(st.text(max_size=40))
def test_parse_rule_only_raises_policy_error(text: str) -> None:
    try:
        rule = parse_rule(text)
    except PolicyError:
        return
    assert parse_rule(rule.to_text()) == rule


@given(
    st.dictionaries(st.text(max_size=12), st.text(max_size=6), max_size=3),
    st.dictionaries(st.text(max_size=12), st.lists(st.text(max_size=12), max_size=3), max_size=3),
)
def test_named_arguments_only_raise_policy_error(
    levels: dict[str, str], calls: dict[str, list[str]]
) -> None:
    try:
        policy = make_policy(levels, calls, calls)
    except PolicyError:
        return
    for key in list(levels) + list(calls):
        name = key[:-2] if key.endswith(".*") else key
        assert isinstance(policy.level(name), Level)
