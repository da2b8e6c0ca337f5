"""Property tests for the text a hostile launcher or client controls: match rules
(xdg_containers/wire/matchrule.py), policy rules and policies (xdg_containers/policy), and
AddServer's named arguments (xdg_containers/servers/arguments.py).

- parsing never raises anything but its own error type (MatchRuleError, PolicyError,
  ArgumentError), whatever the text or the value types;
- what parses renders back to text that parses to the same thing;
- an eavesdropping rule that parses is always reported by rule_requests_eavesdrop;
- the lookups a filter makes on a parsed policy never raise and stay consistent
  (levels only grow with more grants; prefix wildcards never match across a dot).
"""

from __future__ import annotations

from typing import Any

from dbus_fast import Variant
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz_settings
from xdg_containers.policy import (
    Level,
    Policy,
    PolicyError,
    parse_rule,
    policy_from_named_arguments,
)
from xdg_containers.servers.arguments import (
    ARGUMENT_TYPES,
    ArgumentError,
    parse_named_arguments,
    parse_policy_arguments,
)
from xdg_containers.wire.matchrule import (
    MatchRuleError,
    parse_match_rule,
    rule_requests_eavesdrop,
    signal_matches,
)

FUZZ = fuzz_settings()

_any_text = st.text(max_size=80)
_name_chars = st.sampled_from([*"abcXYZ_-019.:*/@ '\\,=\t\n", "\u00e9", "\0"])
_namey = st.text(_name_chars, max_size=30)

# -- match rules -----------------------------------------------------------------------------

_KEYS = [
    "type",
    "sender",
    "interface",
    "member",
    "path",
    "path_namespace",
    "destination",
    "eavesdrop",
    "arg0",
    "arg1",
    "arg63",
    "arg64",
    "arg0path",
    "arg3path",
    "arg0namespace",
    "arg010",
    "arg0x3f",
    "arg+1",
    "arg-0",
    "arg",
    "argx",
    "eaves''drop",
    "EAVESDROP",
    "Type",
    "",
]
_VALUES = [
    "signal",
    "method_call",
    "error",
    "method_return",
    "true",
    "false",
    "tr''ue",
    "'true'",
    "org.freedesktop.DBus",
    ":1.42",
    ":1",
    "org.example.Iface",
    "Member",
    "/",
    "/org/example",
    "/org/example/",
    "a.b",
    "a",
    "",
    "'",
    "\\'",
    "\\",
    ",",
    "x" * 300,
]
_SEPS = [",", ", ", " ,", "\n", "\t", "", ",,", "=", "'", " = "]


@st.composite
def rule_texts(draw: Any) -> str:
    """Rules assembled from the grammar's pieces, quoting and whitespace included."""
    parts: list[str] = []
    for _ in range(draw(st.integers(0, 18))):
        key = draw(st.one_of(st.sampled_from(_KEYS), _namey))
        value = draw(st.one_of(st.sampled_from(_VALUES), _namey))
        quote = draw(st.sampled_from(["", "'", "''"]))
        ws = draw(st.sampled_from(["", " ", "\t", "\n", " \r\n "]))
        parts.append(f"{ws}{key}{ws}={quote}{value}{quote}")
        parts.append(draw(st.sampled_from(_SEPS)))
    return "".join(parts)


def _check_rule_text(text: str) -> None:
    try:
        rule = parse_match_rule(text)
    except MatchRuleError:
        rule = None
    eaves = rule_requests_eavesdrop(text)
    assert isinstance(eaves, bool)
    if rule is None:
        return
    if rule.eavesdrop:
        assert eaves, f"an eavesdropping rule slipped through: {text!r}"
    again = parse_match_rule(rule.to_text())
    assert again == rule, f"{text!r} -> {rule.to_text()!r} -> {again!r}"
    result = signal_matches(
        rule,
        sender=":1.5",
        path="/org/example",
        interface="org.example.Iface",
        member="Member",
        destination=None,
        string_args=["a.b", None, "/org/example/"],
        sender_names=("org.freedesktop.DBus",),
        object_path_args=[None, "/org"],
    )
    assert isinstance(result, bool)


@FUZZ
@given(text=_any_text)
def test_match_rule_any_text(text: str) -> None:
    _check_rule_text(text)


@FUZZ
@given(text=rule_texts())
def test_match_rule_grammar_fuzz(text: str) -> None:
    _check_rule_text(text)


@FUZZ
@given(
    prefix=rule_texts(),
    spelling=st.sampled_from(
        [
            "eavesdrop=true",
            "eavesdrop='true'",
            "eavesdrop=tr''ue",
            "eavesdrop='t'rue",
            "eavesdrop ='true'",
            "\neavesdrop\t=true",
            "eavesdrop=true,eavesdrop=true",
            "eavesdrop=false,eavesdrop=true",
            "eavesdrop=\\'true\\'x",
        ]
    ),
)
def test_eavesdrop_spellings_after_any_prefix(prefix: str, spelling: str) -> None:
    """Wherever an eavesdrop=true lands, if the bus would install it, we say so."""
    text = f"type='signal',{spelling}"
    try:
        rule = parse_match_rule(text)
    except MatchRuleError:
        pass  # (the escaped-quote spelling is invalid for the bus as well)
    else:
        assert rule.eavesdrop and rule_requests_eavesdrop(text)
    _check_rule_text(prefix + "," + spelling)


@fuzz_settings(30)
@given(text=st.text(min_size=1000, max_size=1100))
def test_overlong_rules(text: str) -> None:
    _check_rule_text(text)


# -- policy rules ([METHOD][@PATH]) --------------------------------------------------------------

_RULE_PIECES = [
    "*",
    "org.example.Iface.*",
    "org.example.Iface.Member",
    "org.example.Iface",
    "Member",
    ".",
    "..",
    "org..x.Y",
    "@",
    "@/",
    "@/*",
    "@/a/*",
    "@/a/b",
    "@//*",
    "@/a/",
    "@a",
    "*foo",
    "org.example.*.*",
    "1org.x.Y",
    "org.x.Y-Z",
]


@FUZZ
@given(
    text=st.one_of(
        _any_text, _namey, st.lists(st.sampled_from(_RULE_PIECES), max_size=3).map("".join)
    )
)
def test_policy_rule_text(text: str) -> None:
    try:
        rule = parse_rule(text)
    except PolicyError:
        return
    assert parse_rule(rule.to_text()) == rule, (text, rule.to_text())
    for path in (None, "/", "/a", "/a/b", "/ab"):
        assert isinstance(rule.matches("org.example.Iface", "Member", path), bool)


# -- whole policies ------------------------------------------------------------------------------

_names = st.one_of(
    st.sampled_from(
        [
            "org.example",
            "org.example.*",
            "org.example.App",
            "org.*",
            ":1.5",
            "org.freedesktop.DBus",
            "a.b",
            "a.b.*",
            "a",
            "*",
            ".*",
            "org.example..x",
            "org.example.App.*",
            "x" * 300,
        ]
    ),
    _namey,
)
_level_word = st.one_of(st.sampled_from(["see", "talk", "own", "none", "SEE", "", "Talk"]), _namey)
_hashable_junk: st.SearchStrategy[Any] = st.one_of(
    st.integers(), st.none(), st.binary(max_size=5), st.tuples(st.integers())
)
_junk: st.SearchStrategy[Any] = st.one_of(_hashable_junk, st.lists(st.integers(), max_size=2))
_rule_list = st.one_of(
    st.lists(st.one_of(st.sampled_from(_RULE_PIECES), _namey), max_size=3),
    st.lists(_junk, min_size=1, max_size=2),
    _any_text,
    _junk,
)


@FUZZ
@given(
    policy=st.dictionaries(
        st.one_of(_names, _hashable_junk), st.one_of(_level_word, _junk), max_size=4
    ),
    call=st.dictionaries(st.one_of(_names, _hashable_junk), _rule_list, max_size=3),
    broadcast=st.dictionaries(st.one_of(_names, _hashable_junk), _rule_list, max_size=3),
    probes=st.lists(
        st.one_of(_names, st.sampled_from(["org.example.App.Sub", "org.exampleX", ":1.7", "org"])),
        max_size=6,
    ),
)
def test_policy_from_hostile_arguments(
    policy: Any, call: Any, broadcast: Any, probes: list[str]
) -> None:
    try:
        p = policy_from_named_arguments(policy, call, broadcast)
    except PolicyError:
        return
    _probe(p, probes)


def _probe(p: Policy, probes: list[str]) -> None:
    for name in probes:
        level = p.level(name)
        assert isinstance(level, Level)
        allowed = p.call_allowed(name, "org.example.Iface", "Member", "/a/b")
        if level >= Level.TALK:
            assert allowed
        assert isinstance(p.broadcast_allowed(name, None, None, None), bool)
        assert isinstance(p.start_service_allowed(name), bool)
        assert isinstance(p.any_call_allowed([name, ":1.1"], None, "M", "/"), bool)
        assert p.has_call_rules(name) in (True, False)
        assert p.has_broadcast_rules(name) in (True, False)
        if name.startswith(":"):
            assert level == Level.NONE, "a unique name matched a policy key"


_element = st.text(st.sampled_from("abcxyz_-"), min_size=1, max_size=5).filter(
    lambda e: not e[0].isdigit()
)


@FUZZ
@given(
    prefix=st.lists(_element, min_size=2, max_size=3).map(".".join),
    rest=st.lists(_element, max_size=3),
    extra=st.text(st.sampled_from("abcxyz_"), min_size=1, max_size=3),
    level=st.sampled_from(["see", "talk", "own"]),
)
def test_wildcards_never_cross_a_dot_boundary(
    prefix: str, rest: list[str], extra: str, level: str
) -> None:
    p = policy_from_named_arguments({prefix + ".*": level}, {}, {})
    want = {"see": Level.SEE, "talk": Level.TALK, "own": Level.OWN}[level]
    below = ".".join([prefix, *rest])
    assert p.level(below) == want
    assert p.level(prefix + extra) == Level.NONE, "prefix matched a longer element"
    assert p.level(prefix.rsplit(".", 1)[0]) == Level.NONE
    # More grants never lower a level.
    more = policy_from_named_arguments({prefix + ".*": level, below: "see"}, {}, {})
    assert more.level(below) >= want


# -- AddServer / SetPolicy named arguments -----------------------------------------------------

_variant = st.one_of(
    st.booleans().map(lambda b: Variant("b", b)),
    st.integers(0, 2**31).map(lambda i: Variant("h", i)),
    st.integers(0, 2**32 - 1).map(lambda i: Variant("u", i)),
    _any_text.map(lambda s: Variant("s", s)),
    st.dictionaries(
        st.one_of(_names, _any_text), st.one_of(_level_word, _any_text), max_size=3
    ).map(lambda d: Variant("a{ss}", d)),
    st.dictionaries(
        st.one_of(_names, _any_text),
        st.lists(st.one_of(st.sampled_from(_RULE_PIECES), _any_text), max_size=3),
        max_size=3,
    ).map(lambda d: Variant("a{sas}", d)),
    st.lists(_any_text, max_size=3).map(lambda v: Variant("as", v)),
    st.binary(max_size=10).map(lambda b: Variant("ay", b)),
)
_keys = st.one_of(st.sampled_from(sorted(ARGUMENT_TYPES)), _any_text)


@FUZZ
@given(args=st.dictionaries(_keys, _variant, max_size=6))
def test_named_arguments_raise_only_argument_error(args: dict[str, Variant]) -> None:
    try:
        parsed = parse_named_arguments(args)
    except ArgumentError:
        pass
    else:
        assert set(args) <= set(ARGUMENT_TYPES)
        if parsed.policy is not None:
            _probe(parsed.policy, ["org.example.App", ":1.3"])
    try:
        parse_policy_arguments(args)
    except ArgumentError:
        pass


@FUZZ
@given(args=st.dictionaries(st.sampled_from(sorted(ARGUMENT_TYPES)), _variant, max_size=9))
def test_named_arguments_right_keys_any_types(args: dict[str, Variant]) -> None:
    try:
        parse_named_arguments(args)
    except ArgumentError as exc:
        assert str(exc), "an ArgumentError must say what is wrong"
