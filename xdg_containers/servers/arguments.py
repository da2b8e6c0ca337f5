"""AddServer's named arguments: the supported set, their types, validation (pure).

Unknown keys and wrong types are refused with a message naming the key and
both types, so a launcher author sees the mistake at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Variant

from xdg_containers.policy import Policy, PolicyError, policy_from_named_arguments

EXT = "org.freedesktop.XdgContainers1."
LISTEN_FD = EXT + "ListenFD"
FILTER = EXT + "Filter"
POLICY = EXT + "Policy"
CALL = EXT + "Call"
BROADCAST = EXT + "Broadcast"
LOG = EXT + "Log"
BUS = EXT + "Bus"
CONNECTOR = EXT + "Connector"

#: Every named argument and its D-Bus signature.
ARGUMENT_TYPES: dict[str, str] = {
    "StopOnDisconnect": "b",
    "StopOnNotify": "h",
    LISTEN_FD: "h",
    FILTER: "b",
    POLICY: "a{ss}",
    CALL: "a{sas}",
    BROADCAST: "a{sas}",
    LOG: "b",
    BUS: "s",
    CONNECTOR: "h",
}
SUPPORTED_ARGUMENTS = sorted(ARGUMENT_TYPES)
#: The arguments that carry a file descriptor (type 'h').
FD_ARGUMENTS = tuple(k for k, t in ARGUMENT_TYPES.items() if t == "h")
#: The subset SetPolicy accepts.
POLICY_ARGUMENTS = (FILTER, POLICY, CALL, BROADCAST)


class ArgumentError(ValueError):
    """A named argument is unknown, mistyped or inconsistent; becomes InvalidArgs."""


@dataclass
class NamedArguments:
    """AddServer's named arguments after validation, with defaults filled in."""

    stop_on_disconnect: bool = True
    # fds: the service's own dups of fds attached to the AddServer message
    stop_on_notify: int | None = None
    listen_fd: int | None = None
    #: the service's end of the anchor's SOCK_SEQPACKET socket (SPEC 10)
    connector: int | None = None
    filter: bool = False
    policy: Policy | None = None
    log: bool = False
    bus: str = ""
    present: set[str] = field(default_factory=set)


def _check_types(args: Mapping[str, Variant], allowed: Mapping[str, str]) -> None:
    for key, value in args.items():
        expected = allowed.get(key)
        if expected is None:
            raise ArgumentError(f"unsupported named argument {key!r}")
        actual = value.signature
        if actual != expected:
            raise ArgumentError(
                f"named argument {key!r} must have type '{expected}', not '{actual}'"
            )


def parse_filter_arguments(args: Mapping[str, Variant]) -> tuple[bool, Policy | None]:
    """Validate Filter/Policy/Call/Broadcast; return (enabled, policy)."""
    enabled = bool(args[FILTER].value) if FILTER in args else False
    given = [k for k in (POLICY, CALL, BROADCAST) if k in args]
    if given and not enabled:
        raise ArgumentError(
            f"{', '.join(given)} given without {FILTER}=true: the traffic would not be "
            "filtered; pass Filter=true to apply the policy"
        )
    if not enabled:
        return False, None
    policy_arg: dict[str, str] = dict(args[POLICY].value) if POLICY in args else {}
    call_arg: dict[str, list[str]] = dict(args[CALL].value) if CALL in args else {}
    bcast_arg: dict[str, list[str]] = dict(args[BROADCAST].value) if BROADCAST in args else {}
    try:
        policy = policy_from_named_arguments(policy_arg, call_arg, bcast_arg)
    except PolicyError as exc:
        raise ArgumentError(str(exc)) from exc
    return True, policy


def parse_named_arguments(args: Mapping[str, Variant]) -> NamedArguments:
    """Validate AddServer's named arguments; 'h' values must already be fds the caller
    owns (``service.attached_fd`` made them from the message's attached fds)."""
    _check_types(args, ARGUMENT_TYPES)
    out = NamedArguments(present=set(args))
    if "StopOnDisconnect" in args:
        out.stop_on_disconnect = bool(args["StopOnDisconnect"].value)
    if "StopOnNotify" in args:
        out.stop_on_notify = _fd_value(args["StopOnNotify"], "StopOnNotify")
    if LISTEN_FD in args:
        out.listen_fd = _fd_value(args[LISTEN_FD], LISTEN_FD)
    if CONNECTOR in args:
        out.connector = _fd_value(args[CONNECTOR], CONNECTOR)
    if LOG in args:
        out.log = bool(args[LOG].value)
    if BUS in args:
        out.bus = str(args[BUS].value)
    out.filter, out.policy = parse_filter_arguments(args)
    return out


def parse_policy_arguments(args: Mapping[str, Variant]) -> tuple[bool, Policy | None]:
    """SetPolicy's argument: only the filter keys are allowed."""
    _check_types(args, {k: ARGUMENT_TYPES[k] for k in POLICY_ARGUMENTS})
    return parse_filter_arguments(args)


def _fd_value(value: Variant, key: str) -> int:
    fd: Any = value.value
    if not isinstance(fd, int) or fd < 0:
        raise ArgumentError(f"named argument {key!r} did not carry a file descriptor")
    return fd
