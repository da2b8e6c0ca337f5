"""Tests for xdg_containers.wire.matchrule: match rules parsed and matched as dbus-daemon does.

The expected outcomes of the accept/reject and eavesdrop tables were checked against a real
dbus-daemon 1.14.10 (AddMatch, then Debug.Stats.GetAllMatchRules to read back what it stored).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xdg_containers.wire.matchrule import (
    MAX_MATCH_RULE_LENGTH,
    MatchRule,
    MatchRuleError,
    parse_match_rule,
    rule_requests_eavesdrop,
    signal_matches,
)

_SIXTEEN_ARGS = ",".join(f"arg{i}='x'" for i in range(16))
_FIFTEEN_ARGS = ",".join(f"arg{i}='x'" for i in range(15))

# (rule text, accepted by dbus-daemon, installed with eavesdrop=true)
EAVESDROP_SPELLINGS = [
    ("eavesdrop='true'", True, True),
    ("eavesdrop=true", True, True),
    (" eavesdrop='true'", True, True),
    ("\t\n\r eavesdrop='true'", True, True),
    ("eavesdrop \t\n\r='true'", True, True),
    ("eavesdrop='tr''ue'", True, True),
    ("eavesdrop=tr'ue'", True, True),
    ("eavesdrop='t'r'u'e", True, True),
    ("eavesdrop=''true", True, True),
    ("type='signal',eavesdrop='true'", True, True),
    ("type='signal', \n eavesdrop='true'", True, True),
    ("eavesdrop='false',eavesdrop='true'", True, True),  # the last one wins
    ("eavesdrop='true',eavesdrop='false'", True, False),
    ("eavesdrop='false'", True, False),
    ("arg0='a\\,b',eavesdrop='true'", True, True),  # \, does not end the value...
    ("arg0=a\\,eavesdrop='true'", True, False),  # ...so here eavesdrop is part of arg0
    (_FIFTEEN_ARGS + ",eavesdrop='true'", True, True),
    (_SIXTEEN_ARGS + ",eavesdrop='true'", True, False),  # the 17th token is never read
    ("type='signal',='x',eavesdrop='true'", True, False),  # parsing stops at an empty key
    ("=,eavesdrop='true'", True, False),
    ("sender=':1',eavesdrop='true'", True, True),  # libdbus accepts ':1'
    ("sender=':.a',eavesdrop='true'", True, True),
    ("eavesdrop = 'true'", False, False),  # value " true"
    ("eavesdrop= 'true'", False, False),
    ("eavesdrop='true' ", False, False),  # value "true "
    ("eavesdrop='true' ,type='signal'", False, False),
    ("\teavesdrop\n=\r'true'", False, False),  # value "\rtrue"
    ("eaves''drop='true'", False, False),  # quotes are not special in keys
    ("'eavesdrop'='true'", False, False),
    ("eavesdrop=\\'true\\'", False, False),  # value "'true'"
    ("eavesdrop=true\\", False, False),
    ("eavesdrop='TRUE'", False, False),
    ("EAVESDROP='true'", False, False),
    ("eavesdrop\v='true'", False, False),  # \v is part of the key
    ("type='signal',,eavesdrop='true'", False, False),  # key ",eavesdrop"
    ("eavesdrop='true'=", False, False),
    ("eavesdrop=='true'", False, False),
    ("eavesdrop='true'x", False, False),
    ("eavesdrop='true", False, False),
]


@pytest.mark.parametrize(("text", "accepted", "eavesdrop"), EAVESDROP_SPELLINGS)
def test_eavesdrop_spellings(text: str, accepted: bool, eavesdrop: bool) -> None:
    if accepted:
        assert parse_match_rule(text).eavesdrop is eavesdrop
    else:
        with pytest.raises(MatchRuleError):
            parse_match_rule(text)
    # Rules the bus refuses are refused by the bus; only what it installs matters, plus the
    # defensive fallback covered below.
    if accepted:
        assert rule_requests_eavesdrop(text) is eavesdrop


@pytest.mark.parametrize(
    "text",
    [
        "eavesdrop='true',type='nonsense'",
        "eavesdrop='true',bogus='x'",
        "type='signal',type='signal',eavesdrop='true'",
        "eavesdrop='true',arg64='x'",
        "eavesdrop='true',eavesdrop='maybe'",
    ],
)
def test_eavesdrop_in_an_invalid_rule_is_still_refused(text: str) -> None:
    with pytest.raises(MatchRuleError):
        parse_match_rule(text)
    assert rule_requests_eavesdrop(text) is True


@pytest.mark.parametrize(
    "text",
    ["eavesdrop='true", "eavesdrop", "x", "eavesdrop = 'true'", "a" * 2000],
)
def test_unparseable_rules_do_not_request_eavesdrop(text: str) -> None:
    assert rule_requests_eavesdrop(text) is False


# (rule text, accepted)
ACCEPTANCE = [
    ("", True),
    ("   \t\n", True),
    ("type='signal'", True),
    ("type='method_call'", True),
    ("type='method_return'", True),
    ("type='error'", True),
    ("type='Signal'", False),
    ("type='chouin'", False),
    ("type", False),
    ("x", False),
    (",", False),
    (",,", False),
    ("'", False),
    ("a='", False),
    ("blah='x'", False),
    ("service='x'", False),
    ("interface='org.foo'", True),
    ("interface='org'", False),
    ("interface='org.foo-bar'", False),
    ("member='Foo'", True),
    ("member='Foo.Bar'", False),
    ("sender='org.foo'", True),
    ("sender=':1.2'", True),
    ("sender=':'", True),
    ("sender='org'", False),
    ("sender=':1.'", False),
    ("destination=':1.2.'", False),
    ("destination='org.foo'", True),
    ("path='/'", True),
    ("path='/a/b'", True),
    ("path='/a/'", False),
    ("path_namespace='/'", True),
    ("path_namespace='/foo/'", False),
    ("path='/a',path_namespace='/a'", False),
    ("type='signal',type='signal'", False),
    ("member='Foo',member='Foo'", False),
    ("interface='a.b',interface='a.b'", False),
    ("sender='a.b',sender='a.b'", False),
    ("destination='a.b',destination='a.b'", False),
    ("arg0='x'", True),
    ("arg63='x'", True),
    ("arg64='x'", False),
    ("arg300='x'", False),
    ("arg='x'", False),
    ("argv='x'", False),
    ("arg3junk='x'", False),
    ("argument='x'", False),
    ("arg 0='x'", False),
    ("arg0='a',arg0='b'", False),
    ("arg0='x',arg0path='y'", False),
    ("arg0namespace='a',arg0='b'", False),
    ("arg1namespace='a'", False),
    ("arg00namespace='a'", False),
    ("arg0namespace=''", False),
    ("arg0namespace='foo.'", False),
    ("arg0namespace='foo..bar'", False),
    ("arg0namespace='1a'", False),
    ("arg0namespace='a'", True),
    ("arg0namespace='com.example'", True),
    ("arg0namespace=':1'", True),
    ("arg99999999999999999999='x'", False),  # strtoul overflow
    ("arg18446744073709551615='x'", False),
    ("arg-1='x'", False),
    ("arg+='x'", False),
    ("arg0path=''", True),
    ("arg7path='/foo'", True),
    (_SIXTEEN_ARGS + ",junk", True),  # ignored: beyond the 16th token
    (_SIXTEEN_ARGS + ",arg0='dup'", True),
    (_FIFTEEN_ARGS + ",junk", False),
    ("arg0='\0'", False),
    ("arg0='\udc80'", False),
]


@pytest.mark.parametrize(("text", "accepted"), ACCEPTANCE)
def test_acceptance(text: str, accepted: bool) -> None:
    if accepted:
        assert isinstance(parse_match_rule(text), MatchRule)
    else:
        with pytest.raises(MatchRuleError):
            parse_match_rule(text)


def test_length_limit_counts_utf8_bytes() -> None:
    ascii_ok = "arg0='" + "x" * (MAX_MATCH_RULE_LENGTH - 7) + "'"
    assert len(ascii_ok.encode()) == MAX_MATCH_RULE_LENGTH
    assert parse_match_rule(ascii_ok).args == ((0, "x" * 1017),)
    with pytest.raises(MatchRuleError, match="1025 bytes"):
        parse_match_rule("arg0='" + "x" * (MAX_MATCH_RULE_LENGTH - 6) + "'")
    two_byte_ok = "arg0='" + "é" * 508 + "x'"
    assert len(two_byte_ok.encode()) == MAX_MATCH_RULE_LENGTH
    parse_match_rule(two_byte_ok)
    with pytest.raises(MatchRuleError):
        parse_match_rule("arg0='" + "é" * 509 + "'")


# (key as written, arg number it means, kind)
ARG_KEYS = [
    ("arg0", 0, "string"),
    ("arg00", 0, "string"),
    ("arg010", 8, "string"),  # strtoul base 0: octal
    ("arg077", 63, "string"),
    ("arg0x3f", 63, "string"),  # ...and hexadecimal
    ("arg0X3F", 63, "string"),
    ("arg+1", 1, "string"),
    ("arg-0", 0, "string"),
    ("arg-18446744073709551615", 1, "string"),  # negation modulo 2**64
    ("arg\v2", 2, "string"),  # strtoul skips \v and \f, the tokenizer does not
    ("arg\f0path", 0, "path"),
    ("arg0x3fpath", 63, "path"),
    ("arg12path", 12, "path"),
]


@pytest.mark.parametrize(("key", "number", "kind"), ARG_KEYS)
def test_arg_numbers_are_read_like_strtoul(key: str, number: int, kind: str) -> None:
    rule = parse_match_rule(f"{key}='v'")
    if kind == "string":
        assert rule.args == ((number, "v"),)
        assert rule.arg_paths == ()
    else:
        assert rule.arg_paths == ((number, "v"),)
        assert rule.args == ()


def test_full_rule_fields() -> None:
    rule = parse_match_rule(
        "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
        "member='NameOwnerChanged',path='/org/freedesktop/DBus',destination=':1.5',"
        "arg0='org.foo',arg2path='/a/',eavesdrop='false'"
    )
    assert rule == MatchRule(
        message_type="signal",
        sender="org.freedesktop.DBus",
        interface="org.freedesktop.DBus",
        member="NameOwnerChanged",
        path="/org/freedesktop/DBus",
        destination=":1.5",
        eavesdrop=False,
        args=((0, "org.foo"),),
        arg_paths=((2, "/a/"),),
    )


def test_whitespace_and_useless_quotes() -> None:
    plain = parse_match_rule("type='signal',sender='org.foo.Sender',interface='org.foo.I'")
    noisy = parse_match_rule(
        "    type='signal',  \tsender='org.foo.''Sender',   interface='org.foo.I'''''"
    )
    assert noisy == plain


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("member=escape", "member='escape'"),
        ("member=icecream", "member=ice'cream'"),
        ("arg0='comma,type=comma',type=signal", "type=signal,arg0='comma,type=comma'"),
        ("arg0=escap\\e", "arg0='escap\\e'"),
        ("arg0=Time: 8 o\\'clock", "arg0='Time: 8 o'\\''clock'"),
        ("arg0=a\\", "arg0='a\\'"),
        ("arg0=a\\,b", "arg0='a\\,b'"),
    ],
)
def test_equivalent_spellings(first: str, second: str) -> None:
    assert parse_match_rule(first) == parse_match_rule(second)


def test_values_keep_backslashes_and_quotes() -> None:
    assert parse_match_rule("arg0='a\\b'").args == ((0, "a\\b"),)
    assert parse_match_rule("arg0=o\\'k").args == ((0, "o'k"),)
    assert parse_match_rule("arg0=a\\,b").args == ((0, "a\\,b"),)
    assert parse_match_rule("arg0=' x '").args == ((0, " x "),)
    assert parse_match_rule("arg0=").args == ((0, ""),)


def test_error_messages_say_what_is_wrong() -> None:
    with pytest.raises(MatchRuleError, match="specified twice"):
        parse_match_rule("type='signal',type='error'")
    with pytest.raises(MatchRuleError, match="Unknown key"):
        parse_match_rule("bogus='x'")
    with pytest.raises(MatchRuleError, match="'true' or 'false'"):
        parse_match_rule("eavesdrop='yes'")
    with pytest.raises(MatchRuleError, match="Unbalanced"):
        parse_match_rule("member='Foo")
    with pytest.raises(MatchRuleError, match="no subsequent '='"):
        parse_match_rule("member")


# --- matching ---------------------------------------------------------------------------


def _matches_example(rule: MatchRule) -> bool:
    """Match `rule` against one broadcast signal from :1.7, which owns org.example.Service."""
    return signal_matches(
        rule,
        sender=":1.7",
        sender_names={":1.7", "org.example.Service"},
        path="/org/example/Obj",
        interface="org.example.Iface",
        member="Changed",
        destination=None,
        string_args=["foobar", None, "com.example.backend.foo"],
    )


def _matches_args(
    rule: MatchRule, string_args: list[str | None], object_path_args: list[str | None]
) -> bool:
    return signal_matches(
        rule,
        sender=":1.1",
        path="/",
        interface="a.b",
        member="M",
        destination=None,
        string_args=string_args,
        object_path_args=object_path_args,
    )


MATCHING = [
    ("", True),
    ("type='signal'", True),
    ("type='method_call'", False),
    ("type='error'", False),
    ("interface='org.example.Iface'", True),
    ("interface='org.example.Other'", False),
    ("member='Changed'", True),
    ("member='Other'", False),
    ("sender=':1.7'", True),
    ("sender='org.example.Service'", True),
    ("sender=':1.8'", False),
    ("sender='org.example.Other'", False),
    ("path='/org/example/Obj'", True),
    ("path='/org/example'", False),
    ("path_namespace='/'", True),
    ("path_namespace='/org'", True),
    ("path_namespace='/org/example/Obj'", True),
    ("path_namespace='/org/exam'", False),
    ("path_namespace='/org/example/Obj/Child'", False),
    ("destination=':1.9'", False),  # a broadcast never matches a rule with a destination
    ("arg0='foobar'", True),
    ("arg0='foo'", False),
    ("arg1='3'", False),  # not a string
    ("arg3='x'", False),  # absent
    ("arg0path='foobar'", True),  # equal strings match even when not paths
    ("arg0path='foo'", False),
    ("arg0path='foobar/'", False),
    ("arg0namespace='foobar'", True),
    ("arg0namespace='foo'", False),
    ("arg2='com.example.backend.foo'", True),
    ("type='signal',member='Changed',arg0='foobar'", True),
    ("type='signal',member='Changed',arg0='foobaz'", False),
]


@pytest.mark.parametrize(("text", "matches"), MATCHING)
def test_signal_matching(text: str, matches: bool) -> None:
    assert _matches_example(parse_match_rule(text)) is matches


@pytest.mark.parametrize(
    ("namespace", "matches"),
    [
        ("com.example.backend", True),
        ("com.example", True),
        ("com", True),
        ("com.example.backend.foo", True),
        ("com.example.backend.foo.bar", False),
        ("com.example.backend.foobar", False),
        ("com.example.backend.fo", False),
        ("com.exampl", False),
        ("co", False),
    ],
)
def test_arg0namespace(namespace: str, matches: bool) -> None:
    rule = parse_match_rule(f"arg0namespace='{namespace}'")
    assert _matches_args(rule, ["com.example.backend.foo"], []) is matches


@pytest.mark.parametrize(
    ("value", "as_string", "as_path"),
    [
        ("/aa/", True, False),  # not a valid object path, so only as a string
        ("/aa/bb/", True, False),
        ("/aa/bb/cc/", True, False),
        ("/", True, True),
        ("/aa/bb/cc", True, True),
        ("/aa/b", False, False),
        ("/aa", False, False),
        ("/aa/bb", False, False),
    ],
)
def test_arg_path_matching(value: str, as_string: bool, as_path: bool) -> None:
    rule = parse_match_rule("arg0path='/aa/bb/'")
    assert _matches_args(rule, [value], []) is as_string
    if value.endswith("/") and value != "/":
        return  # not an object path, so it cannot be sent as one
    assert _matches_args(rule, [None], [value]) is as_path


def test_object_paths_only_match_path_keys() -> None:
    assert _matches_args(parse_match_rule("arg0path='/'"), [None], ["/"])
    assert not _matches_args(parse_match_rule("arg0='/'"), [None], ["/"])
    assert not _matches_args(parse_match_rule("arg0namespace='a'"), [None], ["/"])


def test_unicast_signals_match_only_eavesdropping_rules() -> None:
    def match(text: str, destination: str, names: set[str]) -> bool:
        return signal_matches(
            parse_match_rule(text),
            sender=":1.1",
            path="/",
            interface="a.b",
            member="M",
            destination=destination,
            destination_names=names,
            string_args=[],
        )

    assert not match("type='signal'", ":1.2", {":1.2"})
    assert not match("destination=':1.2'", ":1.2", {":1.2"})
    assert match("eavesdrop='true'", ":1.2", {":1.2"})
    assert match("eavesdrop='true',destination=':1.2'", ":1.2", {":1.2"})
    assert match("eavesdrop='true',destination='org.x.Y'", ":1.2", {":1.2", "org.x.Y"})
    assert not match("eavesdrop='true',destination=':1.3'", ":1.2", {":1.2"})


def test_bus_driver_signals_match_its_name() -> None:
    rule = parse_match_rule("sender='org.freedesktop.DBus',member='NameOwnerChanged'")
    assert signal_matches(
        rule,
        sender="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member="NameOwnerChanged",
        destination=None,
        string_args=["org.foo", "", ":1.4"],
    )


# --- properties -------------------------------------------------------------------------

_rule_chars = st.sampled_from([*"eavsdroptrufl=',\\ \t\n\r\v:.;/_-0123456789xXé", "arg"])


@given(st.text(max_size=80) | st.lists(_rule_chars, max_size=40).map("".join))
def test_parse_only_raises_match_rule_error(text: str) -> None:
    try:
        rule = parse_match_rule(text)
    except MatchRuleError:
        assert isinstance(rule_requests_eavesdrop(text), bool)
        return
    # Whatever parses survives a round trip through the canonical spelling.
    assert parse_match_rule(rule.to_text()) == rule
    assert rule_requests_eavesdrop(text) is rule.eavesdrop


_value = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=12
)
_names = st.sampled_from(["org.foo", "org.foo.Bar", ":1.2", "a.b"])


@given(
    message_type=st.none() | st.sampled_from(["signal", "method_call", "method_return", "error"]),
    sender=st.none() | _names,
    interface=st.none() | st.sampled_from(["org.foo", "a.b.C"]),
    member=st.none() | st.sampled_from(["Foo", "_x1"]),
    path_choice=st.sampled_from(["none", "path", "namespace"]),
    path=st.sampled_from(["/", "/a", "/a/b_c"]),
    destination=st.none() | _names,
    eavesdrop=st.booleans(),
    arg_slots=st.dictionaries(
        st.integers(0, 63), st.tuples(st.sampled_from(["", "path"]), _value), max_size=5
    ),
    namespace=st.none() | st.sampled_from(["a", "org.foo", "org.foo-bar.baz"]),
)
def test_rules_built_from_valid_parts_round_trip(
    message_type: str | None,
    sender: str | None,
    interface: str | None,
    member: str | None,
    path_choice: str,
    path: str,
    destination: str | None,
    eavesdrop: bool,
    arg_slots: dict[int, tuple[str, str]],
    namespace: str | None,
) -> None:
    if namespace is not None:
        arg_slots.pop(0, None)
    rule = MatchRule(
        message_type=message_type,
        sender=sender,
        interface=interface,
        member=member,
        path=path if path_choice == "path" else None,
        path_namespace=path if path_choice == "namespace" else None,
        destination=destination,
        eavesdrop=eavesdrop,
        args=tuple(sorted((n, v) for n, (k, v) in arg_slots.items() if k == "")),
        arg_paths=tuple(sorted((n, v) for n, (k, v) in arg_slots.items() if k == "path")),
        arg0namespace=namespace,
    )
    text = rule.to_text()
    if len(text.encode()) <= MAX_MATCH_RULE_LENGTH:
        assert parse_match_rule(text) == rule
        assert rule_requests_eavesdrop(text) is eavesdrop


@given(
    st.lists(st.integers(0, 4), max_size=3),
    st.booleans(),
    st.sampled_from(["", " ", "\t", "\n", "\r", " \r\n\t"]),
    st.sampled_from(["", " ", "\n"]),
    st.sampled_from(["", "type='signal',", "member='Foo',\n", "eavesdrop='false',"]),
)
def test_eavesdrop_true_is_recognised_however_quoted(
    positions: list[int], wrap: bool, lead: str, before_eq: str, prefix: str
) -> None:
    # Empty quote pairs ('') anywhere inside "true", quoted or not, still read as "true".
    value = list("true")
    for pos in sorted(positions, reverse=True):
        value.insert(pos, "''")
    spelled = "".join(value)
    if wrap:
        spelled = f"'{spelled}'"
    text = f"{prefix}{lead}eavesdrop{before_eq}={spelled}"
    assert parse_match_rule(text).eavesdrop is True
    assert rule_requests_eavesdrop(text) is True
