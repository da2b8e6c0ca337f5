"""The filtering policy: levels per bus name and Call/Broadcast rules, as xdg-dbus-proxy has them.

Pure data and decisions, no I/O: the proxy asks "may the client see/call/hear this name?"
and this module answers with the semantics of ``xdg-dbus-proxy --filter``.
"""

# Semantics matched (flatpak/xdg-dbus-proxy flatpak-proxy.c, dbus-proxy.c, xdg-dbus-proxy.xml):
#
# * Levels none < see < talk < own; every entry that matches a name counts and the highest
#   wins. "org.foo.*" is stored as prefix "org.foo" and matches "org.foo" itself and every
#   name below it ("org.foo.bar", "org.foo.bar.baz"), never "org.foobar": the lookup walks
#   the name's dot-prefixes (flatpak_proxy_client_get_max_policy_and_matched). We walk
#   them once, element by element down a trie of the wildcard prefixes, so a lookup costs
#   O(length of the name) whatever the policy and the name (upstream's walk, and ours
#   before, rebuilt each prefix: O(n^2), seconds for a hostile 300 KB dotted name).
# * Policy keys: dbus-proxy.c refuses names starting with ':' and names that are not
#   g_dbus_is_name() after stripping ".*" (so "org.*" is refused too: the prefix must itself
#   be a valid well-known name). We do the same for Policy, and -- stricter than upstream,
#   which does not validate them at all -- for Call and Broadcast keys. Unique names get
#   their level from the names they own (sticky), which is the proxy's bookkeeping.
# * Rules "[METHOD][@PATH]" (filter_new_from_rule): METHOD is "*" (any), "iface.*" (any
#   member of iface) or "iface.Member" (split at the LAST dot, so "org.foo.Bar" means
#   member Bar of interface org.foo); PATH is "/p" (exactly) or "/p/*" (/p and below, not
#   /px; "/*" is every path). Upstream accepts anything here; we reject what is not a
#   valid interface, member or object path, and "*foo", a bare "@", or "//*".
# * Upstream gives every Call/Broadcast rule the level TALK for everything except the
#   call/broadcast decision itself, so a name with only rules (Call or Broadcast alike) is
#   visible (ListNames, GetNameOwner, NameOwnerChanged, AccessDenied rather than
#   NameHasNoOwner) and may be started with StartServiceByName. We model that as
#   level() >= SEE plus start_service_allowed(); calls and broadcasts still need a level of
#   TALK or a matching rule of their own kind (any_filter_matches with FILTER_TYPE_CALL /
#   FILTER_TYPE_BROADCAST), so a Broadcast rule never lets a call through and vice versa.

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..wire.names import (
    MAX_NAME_LENGTH,
    is_valid_interface_name,
    is_valid_member_name,
    is_valid_object_path,
    is_valid_unique_name,
    is_valid_well_known_name,
)

__all__ = [
    "BROADCAST_ARGUMENT",
    "CALL_ARGUMENT",
    "POLICY_ARGUMENT",
    "Level",
    "Policy",
    "PolicyError",
    "Rule",
    "max_level",
    "parse_rule",
    "policy_from_named_arguments",
]

POLICY_ARGUMENT = "org.freedesktop.XdgContainers1.Policy"
CALL_ARGUMENT = "org.freedesktop.XdgContainers1.Call"
BROADCAST_ARGUMENT = "org.freedesktop.XdgContainers1.Broadcast"

_WILDCARD_SUFFIX = ".*"
_CACHE_MAX = 4096
_SHOW_MAX = 120


class Level(enum.IntEnum):
    """How much of a bus name the confined client may use; each level implies the lower ones."""

    NONE = 0
    SEE = 1
    TALK = 2
    OWN = 3


_LEVEL_BY_WORD = {"see": Level.SEE, "talk": Level.TALK, "own": Level.OWN}


class PolicyError(ValueError):
    """An invalid policy entry; the message names the argument, the entry and the problem."""


def max_level(a: Level, b: Level) -> Level:
    """The higher of two levels (levels add up: the highest grant wins)."""
    return a if a >= b else b


def _show(text: object) -> str:
    """repr() for error messages, shortened so a huge hostile entry cannot flood the log."""
    shown = repr(text)
    if len(shown) > _SHOW_MAX:
        shown = shown[: _SHOW_MAX - 3] + "..."
    return shown


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[METHOD][@PATH]`` rule of a Call or Broadcast entry; ``None`` fields match anything."""

    interface: str | None = None
    member: str | None = None
    path: str | None = None
    path_is_prefix: bool = False

    def matches(self, interface: str | None, member: str | None, path: str | None) -> bool:
        """True if a message with these header fields is covered by this rule."""
        if self.path is not None:
            if path is None:
                return False
            if self.path_is_prefix:
                if self.path != "/" and path != self.path and not path.startswith(self.path + "/"):
                    return False
            elif path != self.path:
                return False
        if self.interface is not None and interface != self.interface:
            return False
        return self.member is None or member == self.member

    def to_text(self) -> str:
        """The rule in its command-line syntax; parse_rule() of it gives this rule back."""
        if self.interface is None:
            method = "*"
        else:
            method = f"{self.interface}.{self.member if self.member is not None else '*'}"
        if self.path is None:
            return method
        if self.path_is_prefix:
            return f"{method}@{'' if self.path == '/' else self.path}/*"
        return f"{method}@{self.path}"


def parse_rule(text: str) -> Rule:
    """Parse a ``[METHOD][@PATH]`` rule; raise PolicyError saying what is wrong with it."""
    method, at, path_text = text.partition("@")
    path: str | None = None
    prefix = False
    if at:
        if path_text == "/*":
            path, prefix = "/", True
        elif path_text.endswith("/*"):
            path, prefix = path_text[:-2], True
            if path == "/" or not is_valid_object_path(path):
                raise PolicyError(f"{_show(path_text)} is not an object path or 'path/*' subtree")
        elif is_valid_object_path(path_text):
            path = path_text
        else:
            raise PolicyError(f"{_show(path_text)} is not an object path or 'path/*' subtree")

    if method in ("", "*"):
        return Rule(None, None, path, prefix)
    interface, dot, member = method.rpartition(".")
    if not dot:
        raise PolicyError(f"method {_show(method)} is not '*', 'interface.*' or 'interface.Member'")
    if not is_valid_interface_name(interface):
        raise PolicyError(f"{_show(interface)} is not a valid interface name")
    if member == "*":
        return Rule(interface, None, path, prefix)
    if not is_valid_member_name(member):
        raise PolicyError(f"{_show(member)} is not a valid member name")
    return Rule(interface, member, path, prefix)


def _parse_name_key(argument: str, key: object) -> tuple[str, bool]:
    """Split a policy key into (name or prefix, is_wildcard), validating it."""
    if not isinstance(key, str):
        raise PolicyError(f"{argument}: key {_show(key)} is not a string")
    wildcard = key.endswith(_WILDCARD_SUFFIX)
    name = key[: -len(_WILDCARD_SUFFIX)] if wildcard else key
    if name.startswith(":"):
        what = "unique name" if is_valid_unique_name(name) else "name"
        raise PolicyError(
            f"{argument}: {what} {_show(key)} cannot be a policy key "
            "(use a well-known name or 'prefix.*'; a unique name gets the level of the names "
            "it owns)"
        )
    if not is_valid_well_known_name(name):
        raise PolicyError(
            f"{argument}: {_show(key)} is not a valid well-known bus name or 'prefix.*' wildcard"
        )
    return name, wildcard


@dataclass(frozen=True, slots=True)
class _Grant:
    """What one name resolves to: the explicit level and the rules that cover it."""

    level: Level = Level.NONE
    calls: tuple[Rule, ...] = ()
    broadcasts: tuple[Rule, ...] = ()

    def merged(self, other: _Grant) -> _Grant:
        return _Grant(
            max_level(self.level, other.level),
            self.calls + other.calls,
            self.broadcasts + other.broadcasts,
        )


_NO_GRANT = _Grant()


class _Trie:
    """Wildcard prefixes by element: ``org.foo.*`` is root -> "org" -> "foo" (grant)."""

    __slots__ = ("children", "grant")

    def __init__(self) -> None:
        self.children: dict[str, _Trie] = {}
        self.grant: _Grant | None = None

    def add(self, prefix: str, grant: _Grant) -> None:
        node = self
        for element in prefix.split("."):
            child = node.children.get(element)
            if child is None:
                child = node.children[element] = _Trie()
            node = child
        node.grant = grant

    def merged_along(self, name: str, grant: _Grant) -> _Grant:
        """``grant`` merged with every wildcard grant on ``name``'s dot-prefixes.

        One pass: each element is cut once and looked up in one small dict, and the
        walk stops at the first element no wildcard has, so the cost is O(len(name)).
        """
        node = self
        start = 0
        while True:
            dot = name.find(".", start)
            child = node.children.get(name[start:] if dot < 0 else name[start:dot])
            if child is None:
                return grant
            if child.grant is not None:
                grant = grant.merged(child.grant)
            if dot < 0 or not child.children:
                return grant
            node = child
            start = dot + 1


class Policy:
    """The filtering policy of one server: immutable, built once per AddServer/SetPolicy.

    Lookups are cached per name in a bounded dict. Keys are well-known names or ``prefix.*``
    wildcards; `levels` gives see/talk/own, `calls`/`broadcasts` the rules per key.
    """

    __slots__ = (
        "_cache", "_exact", "_trie", "_wildcards", "call_passes", "names_exact",
        "wildcard_prefixes",
    )

    names_exact: frozenset[str]
    wildcard_prefixes: frozenset[str]

    def __init__(
        self,
        levels: Mapping[str, Level],
        calls: Mapping[str, Sequence[Rule]],
        broadcasts: Mapping[str, Sequence[Rule]],
    ) -> None:
        exact: dict[str, _Grant] = {}
        wildcards: dict[str, _Grant] = {}

        def add(argument: str, key: str, grant: _Grant) -> None:
            name, wildcard = _parse_name_key(argument, key)
            table = wildcards if wildcard else exact
            table[name] = table.get(name, _NO_GRANT).merged(grant)

        for key, level in levels.items():
            add(POLICY_ARGUMENT, key, _Grant(level=Level(level)))
        for key, rules in calls.items():
            add(CALL_ARGUMENT, key, _Grant(calls=tuple(rules)))
        for key, rules in broadcasts.items():
            add(BROADCAST_ARGUMENT, key, _Grant(broadcasts=tuple(rules)))

        def matters(grant: _Grant) -> bool:
            return grant.level > Level.NONE or bool(grant.calls) or bool(grant.broadcasts)

        self._exact = {k: g for k, g in exact.items() if matters(g)}
        self._wildcards = {k: g for k, g in wildcards.items() if matters(g)}
        self._trie = _Trie()
        for prefix, grant in self._wildcards.items():
            self._trie.add(prefix, grant)
        self._cache: dict[str, _Grant] = {}
        #: Header-field arrays of calls to well-known names this policy lets through ->
        #: their destination (fastpath.py). Judged by the policy alone, so every
        #: connection under it shares them: a new connection's first call is a known one.
        self.call_passes: dict[bytes, str] = {}
        #: Exact names the proxy must track ownership of (GetNameOwner at start, arg0 matches).
        self.names_exact = frozenset(self._exact)
        #: Wildcard prefixes ("org.foo" for "org.foo.*") to track with arg0namespace.
        self.wildcard_prefixes = frozenset(self._wildcards)

    def __repr__(self) -> str:
        return (
            f"Policy(names_exact={sorted(self.names_exact)!r}, "
            f"wildcard_prefixes={sorted(self.wildcard_prefixes)!r})"
        )

    def _grant(self, name: str) -> _Grant:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        grant = _NO_GRANT
        # Unique names never match a key: their level comes from the names they own.
        if not name.startswith(":"):
            grant = self._exact.get(name, _NO_GRANT)
            if self._wildcards:
                grant = self._trie.merged_along(name, grant)
        if len(name) > MAX_NAME_LENGTH:
            return grant  # no valid name: never kept (the cache's memory stays bounded)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[name] = grant
        return grant

    def level(self, name: str) -> Level:
        """The highest level any entry grants `name`; Call or Broadcast rules make it at least SEE.

        Unique names (``:1.2``) get NONE here: they inherit from the names they own.
        """
        grant = self._grant(name)
        if grant.calls or grant.broadcasts:
            return max_level(grant.level, Level.SEE)
        return grant.level

    def call_allowed(
        self, name: str, interface: str | None, member: str | None, path: str | None
    ) -> bool:
        """True if the client may call this method on `name`: TALK, or a matching Call rule."""
        grant = self._grant(name)
        if grant.level >= Level.TALK:
            return True
        return any(rule.matches(interface, member, path) for rule in grant.calls)

    def broadcast_allowed(
        self, name: str, interface: str | None, member: str | None, path: str | None
    ) -> bool:
        """True if the client may receive this broadcast from `name`.

        That takes TALK, or a matching Broadcast rule.
        """
        grant = self._grant(name)
        if grant.level >= Level.TALK:
            return True
        return any(rule.matches(interface, member, path) for rule in grant.broadcasts)

    def has_call_rules(self, name: str) -> bool:
        """True if any Call entry (exact or wildcard) covers `name`."""
        return bool(self._grant(name).calls)

    def has_broadcast_rules(self, name: str) -> bool:
        """True if any Broadcast entry (exact or wildcard) covers `name`."""
        return bool(self._grant(name).broadcasts)

    def start_service_allowed(self, name: str) -> bool:
        """True if StartServiceByName(`name`) may pass: TALK, or any Call/Broadcast rule for it.

        xdg-dbus-proxy checks StartServiceByName against its merged level, in which every
        rule counts as TALK; we keep that outcome.
        """
        grant = self._grant(name)
        return grant.level >= Level.TALK or bool(grant.calls) or bool(grant.broadcasts)

    def any_call_allowed(
        self, names: Iterable[str], interface: str | None, member: str | None, path: str | None
    ) -> bool:
        """call_allowed() over every name a peer owns or owned (xdg-dbus-proxy merges them)."""
        return any(self.call_allowed(n, interface, member, path) for n in names)

    def any_broadcast_allowed(
        self, names: Iterable[str], interface: str | None, member: str | None, path: str | None
    ) -> bool:
        """broadcast_allowed() over every name a peer owns or owned (merged, as upstream)."""
        return any(self.broadcast_allowed(n, interface, member, path) for n in names)


def policy_from_named_arguments(
    policy: Mapping[str, str],
    call: Mapping[str, Sequence[str]],
    broadcast: Mapping[str, Sequence[str]],
) -> Policy:
    """Validate and build a Policy from AddServer's Policy (a{ss}), Call and Broadcast (a{sas}).

    Raises PolicyError naming the argument key, the entry and what is wrong with it.
    """
    levels: dict[str, Level] = {}
    for key, word in policy.items():
        _parse_name_key(POLICY_ARGUMENT, key)
        level = _LEVEL_BY_WORD.get(word) if isinstance(word, str) else None
        if level is None:
            raise PolicyError(
                f"{POLICY_ARGUMENT}: invalid level {_show(word)} for {_show(key)} "
                "(expected see, talk or own)"
            )
        levels[key] = level

    def rules_of(argument: str, entries: Mapping[str, Sequence[str]]) -> dict[str, list[Rule]]:
        parsed: dict[str, list[Rule]] = {}
        for key, texts in entries.items():
            _parse_name_key(argument, key)
            if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
                raise PolicyError(f"{argument}: rules for {_show(key)} must be a list of strings")
            rules: list[Rule] = []
            for text in texts:
                if not isinstance(text, str):
                    raise PolicyError(
                        f"{argument}: rule {_show(text)} for {_show(key)} is not a string"
                    )
                try:
                    rules.append(parse_rule(text))
                except PolicyError as exc:
                    raise PolicyError(
                        f"{argument}: invalid rule {_show(text)} for {_show(key)}: {exc}"
                    ) from None
            parsed[key] = rules
        return parsed

    return Policy(levels, rules_of(CALL_ARGUMENT, call), rules_of(BROADCAST_ARGUMENT, broadcast))
