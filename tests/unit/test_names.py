"""Tests for the D-Bus name validators in xdg_containers.wire.names (D-Bus spec "Valid Names")."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xdg_containers.wire.names import (
    MAX_NAME_LENGTH,
    is_valid_bus_name,
    is_valid_error_name,
    is_valid_interface_name,
    is_valid_member_name,
    is_valid_object_path,
    is_valid_unique_name,
    is_valid_well_known_name,
)

WELL_KNOWN = [
    ("org.freedesktop.DBus", True),
    ("org.gnome.Service-for_you", True),
    ("a.b", True),
    ("_a.-b", True),
    ("org.example.App2", True),
    ("org.example.a2.b3", True),
    ("org", False),  # needs two elements
    ("", False),
    (".org.foo", False),
    ("org.foo.", False),
    ("org..foo", False),
    ("1org.foo", False),  # no element may start with a digit
    ("org.2foo", False),
    ("org.foo bar", False),
    ("org.fóo", False),
    ("org.foo\n", False),
    ("org.foo/bar", False),
    ("org.foo*", False),
    ("org.foo.*", False),
]

UNIQUE = [
    (":1.2", True),
    (":1.42.7", True),
    (":abc.def", True),
    (":a-b._c", True),
    (":1", False),  # the specification wants two elements (libdbus is laxer)
    (":", False),
    (":.1", False),
    (":1.", False),
    (":1..2", False),
    ("1.2", False),
    ("::1.2", False),
    (":1.2\n", False),
    (":1.٢", False),  # a non-ASCII digit
]

INTERFACES = [
    ("org.freedesktop.DBus", True),
    ("org.freedesktop.DBus.Properties", True),
    ("a.b", True),
    ("_a._b", True),
    ("org.foo2.Bar3", True),
    ("org", False),
    ("org.foo-bar", False),  # '-' is allowed in bus names only
    ("org.2foo", False),
    ("org..foo", False),
    (".org.foo", False),
    ("org.foo.", False),
    ("", False),
    ("org.foo\n", False),
]

MEMBERS = [
    ("Hello", True),
    ("_x", True),
    ("Get2", True),
    ("a", True),
    ("", False),
    ("2Get", False),
    ("Get.Foo", False),
    ("Get-Foo", False),
    ("Gét", False),
    ("Get\n", False),
]

PATHS = [
    ("/", True),
    ("/a", True),
    ("/org/freedesktop/DBus", True),
    ("/a_b/C0/9", True),
    ("", False),
    ("a", False),
    ("//", False),
    ("/a/", False),
    ("/a//b", False),
    ("/a-b", False),
    ("/a.b", False),
    ("/a/*", False),
    ("/é", False),
    ("/a\n", False),
]


#: Each table of names with the validators that must all give its verdict.
CHECKS: dict[str, tuple[list[tuple[str, bool]], tuple[Callable[[str], bool], ...]]] = {
    "well-known": (WELL_KNOWN, (is_valid_well_known_name, is_valid_bus_name)),
    "unique": (UNIQUE, (is_valid_unique_name, is_valid_bus_name)),
    "interface": (INTERFACES, (is_valid_interface_name, is_valid_error_name)),
    "member": (MEMBERS, (is_valid_member_name,)),
    "path": (PATHS, (is_valid_object_path,)),
}


@pytest.mark.parametrize(
    ("kind", "name", "valid"),
    [(kind, name, valid) for kind, (table, _) in CHECKS.items() for name, valid in table],
)
def test_names(kind: str, name: str, valid: bool) -> None:
    for check in CHECKS[kind][1]:
        assert check(name) is valid, check.__name__


def test_unique_and_well_known_are_disjoint() -> None:
    assert not is_valid_well_known_name(":1.2")
    assert not is_valid_unique_name("org.foo")


@pytest.mark.parametrize(
    "check",
    [is_valid_well_known_name, is_valid_interface_name, is_valid_bus_name],
)
def test_name_length_limit(check: Callable[[str], bool]) -> None:
    exact = "a." + "b" * (MAX_NAME_LENGTH - 2)
    assert len(exact) == 255
    assert check(exact)
    assert not check(exact + "c")


def test_unique_and_member_length_limit() -> None:
    unique = ":1." + "2" * (MAX_NAME_LENGTH - 3)
    assert is_valid_unique_name(unique)
    assert not is_valid_unique_name(unique + "3")
    assert is_valid_member_name("a" * MAX_NAME_LENGTH)
    assert not is_valid_member_name("a" * (MAX_NAME_LENGTH + 1))


def test_object_paths_have_no_length_limit() -> None:
    assert is_valid_object_path("/a" * 1000)


_first = st.sampled_from("abcXYZ_")
_rest = st.text(alphabet="abcXYZ_0129", max_size=6)
_element = st.builds(lambda a, b: a + b, _first, _rest)


@given(st.lists(_element, min_size=2, max_size=6))
def test_built_names_are_valid(elements: list[str]) -> None:
    name = ".".join(elements)
    assert is_valid_well_known_name(name)
    assert is_valid_interface_name(name)
    assert is_valid_unique_name(":" + name)
    assert is_valid_object_path("/" + "/".join(elements))
    assert is_valid_member_name(elements[0])


@given(st.text(max_size=40))
def test_validators_are_total(text: str) -> None:
    # Never raise, whatever the input; unique and well-known never both hold.
    results = [
        is_valid_bus_name(text),
        is_valid_error_name(text),
        is_valid_interface_name(text),
        is_valid_member_name(text),
        is_valid_object_path(text),
    ]
    assert all(isinstance(r, bool) for r in results)
    assert not (is_valid_unique_name(text) and is_valid_well_known_name(text))
