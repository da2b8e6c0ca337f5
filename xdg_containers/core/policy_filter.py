"""The filter of a server with ``Filter=true``: xdg-dbus-proxy's semantics, minus its bugs.

Judges every message of one connection against the server's Policy and the
service-wide NameTracker. Decisions only; the session does the I/O. See
docs/policy.md for the rules and where we deliberately differ upstream.
"""

from __future__ import annotations

import functools
from collections.abc import Collection

from ..policy import Level, Policy
from ..policy.tracker import NameTracker
from ..wire.build import bus_call, method_return
from ..wire.header import (
    ERROR,
    METHOD_CALL,
    METHOD_RETURN,
    NO_AUTO_START,
    NO_REPLY_EXPECTED,
    SIGNAL,
    Header,
    MessageError,
    Raw,
)
from ..wire.names import MAX_NAME_LENGTH, is_too_long
from ..wire.names import shorten as _s
from ..wire.types import BodyWriter, SignatureError, read_string, read_string_array
from .basic_filter import service_signal
from .decision import (
    ACCESS_DENIED,
    BUS_NAME,
    NAME_HAS_NO_OWNER,
    SERVICE_UNKNOWN,
    Decision,
    always_forbidden,
    deny,
    drop,
    first_string_arg,
    remember_pass,
    replace,
)
from .policy_driver import driver_call

#: Calls to our own service a confined connection may make whatever the policy says.
_SELF_QUERIES = frozenset({"GetConnectionInfo", "GetServerInfo", "GetConnectionCredentials"})
#: Bounds on per-connection bookkeeping (memory per connection is bounded).
_MAX_EXPECTED_REPLIES = 16384
_MAX_SEEN_PEERS = 4096
_NO_NAMES: frozenset[str] = frozenset()
#: Our own AddMatch calls carry NO_REPLY_EXPECTED, so their serial never gets a reply.
INTERNAL_SERIAL = 0xFFFFFFFF


def _name_owner_changed_rule(arg: str) -> str:
    return (
        "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
        f"member='NameOwnerChanged',{arg}"
    )


@functools.lru_cache(maxsize=64)
def _policy_rules(policy: Policy) -> tuple[str, ...]:
    """The owner-change match rules a policy needs (the same for all its connections)."""
    rules = [_name_owner_changed_rule(f"arg0='{n}'") for n in sorted(policy.names_exact)]
    rules += [
        _name_owner_changed_rule(f"arg0namespace='{p}'") for p in sorted(policy.wildcard_prefixes)
    ]
    return tuple(rules)


@functools.lru_cache(maxsize=1024)
def _add_match(rule: str) -> bytes:
    return bus_call(INTERNAL_SERIAL, "AddMatch", flags=NO_REPLY_EXPECTED, arg=rule)



class PolicyFilter:
    """Per-connection filter state: expected replies, peers seen, cached levels."""

    def __init__(
        self, policy: Policy, tracker: NameTracker, service_names: Collection[str]
    ) -> None:
        """One per confined connection of a filtered server."""
        self.policy = policy
        self.tracker = tracker
        self.service_names = service_names
        self.own_name: str | None = None
        # Calls peers made to the client: (peer, serial) awaiting the client's reply.
        self._expected: dict[tuple[str, int], None] = {}
        self._seen_peers: dict[str, None] = {}
        # Sticky history, per connection as in xdg-dbus-proxy: every policy-relevant
        # name each unique name has owned since this client said Hello.
        self._history: dict[str, set[str]] = {}
        self._level_cache: dict[str, tuple[int, Level]] = {}
        # Header-field arrays of calls that passed -> their destination (fastpath.py);
        # the policy's own, shared with the other connections under it.
        self.call_passes: dict[bytes, str] = policy.call_passes
        self._hello_sent = False
        self._subscribed: frozenset[str] = frozenset()  # match rules sent to the bus

    # -- set-up and policy changes ------------------------------------------------------

    def hello_sent(self) -> list[bytes]:
        """Subscribe to policy names' changes, in the same write as the client's Hello.

        The subscription (AddMatch without reply) makes the bus send us owner
        changes in order with everything else on this connection, so a peer's
        level is known before its next message arrives. Sent right behind the
        Hello, it is in place before the client hears its name.
        """
        self._hello_sent = True
        return self._new_subscriptions()

    def hello_done(self, unique_name: str) -> list[bytes]:
        """Learn our name and snapshot current owners; subscribe to what is not yet."""
        self.own_name = unique_name
        self._snapshot()
        return self._new_subscriptions()

    def _snapshot(self) -> None:
        """Current owners of the policy's names (all names only if it has wildcards)."""
        if self.policy.wildcard_prefixes:
            for name, owner in self.tracker.owners():
                self._owned(name, owner)
            return
        for name in self.policy.names_exact:
            current = self.tracker.owner_of(name)
            if current is not None:
                self._owned(name, current)

    def _owned(self, name: str, owner: str) -> None:
        """Record that ``owner`` owns ``name`` (if the policy cares about ``name``)."""
        if self.policy.level(name) == Level.NONE and not self.policy.start_service_allowed(name):
            return
        names = self._history.get(owner)
        if names is None:
            names = self._history[owner] = set()
        names.add(name)

    def _new_subscriptions(self) -> list[bytes]:
        """AddMatch messages for the current policy's rules not subscribed yet."""
        new = [r for r in _policy_rules(self.policy) if r not in self._subscribed]
        if not new:
            return []
        self._subscribed = self._subscribed.union(new)
        return [_add_match(r) for r in new]

    def update_policy(self, policy: Policy | None) -> list[bytes]:
        """SetPolicy: judge the next message by the new policy; subscribe to new names."""
        if policy is None:
            policy = Policy({}, {}, {})
        self.policy = policy
        self._level_cache.clear()
        self.call_passes = policy.call_passes
        if self.own_name is None:
            # Before the Hello, hello_sent subscribes for the policy of that moment;
            # after it (the reply still on its way) anything new can follow it now.
            return self._new_subscriptions() if self._hello_sent else []
        self._snapshot()
        return self._new_subscriptions()

    # -- levels ---------------------------------------------------------------------------

    def level_of(self, name: str) -> Level:
        """The client's level for a bus name (well-known or unique)."""
        if not name.startswith(":"):
            if name == BUS_NAME:
                return Level.TALK
            return self.policy.level(name)
        if name == self.own_name:
            return Level.TALK
        history = self._history.get(name, _NO_NAMES)
        gen = len(history)
        cached = self._level_cache.get(name)
        if cached is not None and cached[0] == gen:
            return cached[1]
        level = Level.NONE
        for owned in history:
            lv = self.policy.level(owned)
            if lv > level:
                level = lv
        if level < Level.SEE and name in self._seen_peers:
            level = Level.SEE
        if len(self._level_cache) > 4096:
            self._level_cache.clear()
        self._level_cache[name] = (gen, level)
        return level

    def _visible(self, name: str) -> bool:
        return self.level_of(name) >= Level.SEE

    def _call_allowed(self, dest: str, hdr: Header) -> bool:
        if not dest.startswith(":"):
            return self.policy.call_allowed(dest, hdr.interface, hdr.member, hdr.path)
        if self.level_of(dest) >= Level.TALK:
            return True
        return self.policy.any_call_allowed(
            self._history.get(dest, _NO_NAMES), hdr.interface, hdr.member, hdr.path
        )

    def _broadcast_allowed(self, sender: str, hdr: Header) -> bool:
        if self.level_of(sender) >= Level.TALK:
            return True
        return self.policy.any_broadcast_allowed(
            self._history.get(sender, _NO_NAMES), hdr.interface, hdr.member, hdr.path
        )

    def _is_ours(self, dest: str) -> bool:
        """Whether a destination is the client itself (its unique name or a name it owns)."""
        if dest == self.own_name:
            return True
        return self.own_name is not None and self.tracker.owner_of(dest) == self.own_name

    def _hidden(self, hdr: Header, dest: str) -> Decision:
        """The error for a call to a name the client may not see (as if unowned)."""
        if dest.startswith(":") or hdr.flags & NO_AUTO_START:
            return deny(NAME_HAS_NO_OWNER, f"The name {_s(dest)} is not owned by anyone")
        return deny(
            SERVICE_UNKNOWN, f"The name {_s(dest)} was not provided by any .service files"
        )

    # -- client -> bus ---------------------------------------------------------------------

    def from_client(self, hdr: Header, data: Raw) -> Decision | None:
        """Judge a message the client sends; MessageError (the session closes the
        connection) for a destination over 255 bytes, which no bus accepts either."""
        t = hdr.message_type
        if hdr.destination is not None and is_too_long(hdr.destination):
            # Before any lookup (a policy decision costs the name's length). The bus
            # disconnects a client whose header names an invalid destination; so do we.
            raise MessageError(
                f"destination {_s(hdr.destination, 64)} is longer than {MAX_NAME_LENGTH} bytes"
            )
        if t == METHOD_CALL:
            forbidden = always_forbidden(hdr, data, self.service_names)
            if forbidden is not None:
                return forbidden
            decision = self._client_call(hdr, data)
            if decision is None:
                to = hdr.destination or ""
                if not to.startswith(":") and to != BUS_NAME and to not in self.service_names:
                    # Judged by the policy alone (no peer history, no body): the same
                    # header fields pass again until the policy changes.
                    remember_pass(self.call_passes, hdr, data, to)
            if decision is not None and not hdr.expects_reply:
                return drop(decision.reason)
            return decision
        if t in (METHOD_RETURN, ERROR):
            return self._client_reply(hdr)
        if t == SIGNAL:
            dest = hdr.destination
            if dest is None:
                return None  # the client's own broadcasts
            if dest == BUS_NAME:
                return drop("signal to the bus driver")
            if self._call_allowed(dest, hdr):
                return None
            return drop(f"unicast signal to {_s(dest)} not allowed")
        return drop("unknown message type")

    def _client_reply(self, hdr: Header) -> Decision | None:
        dest = hdr.destination
        rs = hdr.reply_serial
        if dest is None or rs is None:
            return drop("reply without destination")
        key = (dest, rs)
        if key in self._expected:
            del self._expected[key]
            return None
        return drop(f"reply to {_s(dest)} serial {rs}, which did not call the client")

    def _client_call(self, hdr: Header, data: Raw) -> Decision | None:
        dest = hdr.destination
        if dest is None:
            return deny(ACCESS_DENIED, "method calls need a destination")
        if dest == BUS_NAME:
            return driver_call(self, hdr, data)
        if dest in self.service_names and hdr.member in _SELF_QUERIES:
            if self._about_self(hdr, data):
                return None
            # As unfiltered: the service would refuse it, and so do we.
            return deny(
                ACCESS_DENIED, "a confined connection may only ask about its own connection"
            )
        if self._call_allowed(dest, hdr):
            return None
        if self._visible(dest):
            return deny(
                ACCESS_DENIED,
                f"{_s(hdr.interface)}.{_s(hdr.member)} on {_s(dest)} at {_s(hdr.path)} "
                "is not allowed "
                "by this container's policy",
            )
        return self._hidden(hdr, dest)

    def _about_self(self, hdr: Header, data: Raw) -> bool:
        """Whether a query to our service names the client itself (or is about a path)."""
        arg = first_string_arg(hdr, data)
        if arg is None or hdr.signature == "o":
            return True  # GetServerInfo(path): the service checks it is the client's own
        return self._is_ours(arg)

    # -- bus -> client ---------------------------------------------------------------------

    def from_bus(self, hdr: Header, data: Raw) -> Decision | None:
        """Judge a message on its way to the client."""
        t = hdr.message_type
        if t in (METHOD_RETURN, ERROR):
            return self._bus_reply(hdr, data)
        if t == SIGNAL:
            return service_signal(hdr, self.service_names) or self._bus_signal(hdr, data)
        if t == METHOD_CALL:
            dest = hdr.destination
            sender = hdr.sender
            if dest is None or not self._is_ours(dest) or sender is None:
                return drop(f"call to {_s(dest)}, which is not this client")
            self._mark_seen(sender)
            if hdr.expects_reply:
                expected = self._expected
                expected[(sender, hdr.serial)] = None
                if len(expected) > _MAX_EXPECTED_REPLIES:
                    expected.pop(next(iter(expected)))
            return None
        return drop("unknown message type")

    def _mark_seen(self, peer: str) -> None:
        if peer.startswith(":") and peer not in self._seen_peers:
            self._seen_peers[peer] = None
            self._level_cache.pop(peer, None)
            if len(self._seen_peers) > _MAX_SEEN_PEERS:
                self._seen_peers.pop(next(iter(self._seen_peers)))

    def forget_peer(self, unique_name: str) -> None:
        """A peer left the bus (some time ago): drop what we kept about it."""
        self._seen_peers.pop(unique_name, None)
        self._level_cache.pop(unique_name, None)
        self._history.pop(unique_name, None)

    def fast_reply(self, reply_serial: int, sender: str) -> None:
        """A reply from peer ``sender`` (not the driver) answering a call of the client."""
        if sender.startswith(":") and sender not in self._seen_peers:
            self._mark_seen(sender)

    def unexpected_reply(self, hdr: Header) -> Decision | None:
        """A reply answering no outstanding call of the client (the session keeps them,
        by (peer, serial)): dropped."""
        return drop(f"reply serial {hdr.reply_serial} answers no outstanding call of the client")

    def _bus_reply(self, hdr: Header, data: Raw) -> Decision | None:
        """A reply the session matched to a call of the client.

        What is filtered is judged by the reply itself, not by the call it was matched
        to: with reused serials the match is the oldest plausible call, so a driver
        METHOD_RETURN listing names is filtered whichever call it answers.
        """
        sender = hdr.sender
        if sender == BUS_NAME:
            if hdr.message_type == METHOD_RETURN:
                return self._driver_reply(hdr, data)
            return None
        if sender is not None and sender.startswith(":"):
            self._mark_seen(sender)
        return None

    def _driver_reply(self, hdr: Header, data: Raw) -> Decision | None:
        sig = hdr.signature
        if sig == "as":
            try:
                names, _ = read_string_array(data, hdr.body_offset, hdr.little_endian)
            except SignatureError:
                return None
            # ListNames and ListActivatableNames are the only driver calls answering 'as'
            # (ListQueuedOwners needs own, whose owners are visible anyway).
            kept = [n for n in names if self._visible(n)]
            if len(kept) == len(names):
                return None
            body = BodyWriter()
            body.string_array(kept)
            return replace(
                method_return(
                    hdr.serial, hdr.reply_serial or 0, BUS_NAME, hdr.destination, "as",
                    body.bytes(),
                )
            )
        return None

    def _bus_signal(self, hdr: Header, data: Raw) -> Decision | None:
        sender = hdr.sender
        dest = hdr.destination
        if sender == BUS_NAME:
            if hdr.member == "NameOwnerChanged" and hdr.signature == "sss":
                return self._name_owner_changed(hdr, data)
            if hdr.member in ("NameAcquired", "NameLost") and hdr.signature == "s":
                name = first_string_arg(hdr, data)
                if name is not None and self.own_name is not None and hdr.member == "NameAcquired":
                    self.tracker.learn_owner(name, self.own_name)
                    self._owned(name, self.own_name)
                return None
            return None
        if sender is None:
            return drop("signal without sender")
        if dest is not None:
            if self._is_ours(dest):
                self._mark_seen(sender)
                return None
            return drop(f"unicast signal to {_s(dest)}, which is not this client")
        if self._broadcast_allowed(sender, hdr):
            return None
        return drop(f"broadcast {_s(hdr.interface)}.{_s(hdr.member)} from {sender} not allowed")

    def _name_owner_changed(self, hdr: Header, data: Raw) -> Decision | None:
        try:
            name, pos = read_string(data, hdr.body_offset, hdr.little_endian)
            old, pos = read_string(data, pos, hdr.little_endian)
            new, _ = read_string(data, pos, hdr.little_endian)
        except SignatureError:
            return drop("malformed NameOwnerChanged")
        # Judge visibility before applying the change: a departing peer is still
        # known to this connection when its own departure is announced.
        visible = self._visible(name)
        self.tracker.name_owner_changed(name, old, new)
        if new and not name.startswith(":"):
            self._owned(name, new)
        return None if visible else drop(f"NameOwnerChanged for hidden {name}")
