"""``xdg-containers run``'s command line: its flags, their checks, and the AddServer named
arguments they become (no bus needed, so the parts are unit-testable)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from dbus_fast import Variant

from .policy import PolicyError, parse_rule, policy_from_named_arguments

EXT = "org.freedesktop.XdgContainers1."

_LEVEL_FLAGS = ("see", "talk", "own")
_RULE_FLAGS = ("call", "broadcast")


def _strip_argument_prefix(text: str) -> str:
    """A PolicyError's text without the ``org.freedesktop.XdgContainers1.X: `` prefix."""
    head, sep, rest = text.partition(": ")
    return rest if sep and head.startswith(EXT) else text


def _policy_name(text: str) -> str:
    """argparse type of --see/--talk/--own: a well-known name or ``prefix.*``."""
    try:
        policy_from_named_arguments({text: "see"}, {}, {})
    except PolicyError as exc:
        raise argparse.ArgumentTypeError(_strip_argument_prefix(str(exc))) from None
    return text


def _name_rule(text: str) -> tuple[str, str]:
    """argparse type of --call/--broadcast: ``NAME=RULE`` with a valid name and rule."""
    name, eq, rule = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"expected NAME=RULE, got {text!r}")
    _policy_name(name)
    try:
        parse_rule(rule)
    except PolicyError as exc:
        raise argparse.ArgumentTypeError(f"invalid rule {rule!r} for {name!r}: {exc}") from None
    return name, rule


def _key_value(text: str) -> tuple[str, str]:
    """argparse type of --metadata: ``KEY=VALUE`` with a non-empty key."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_run_arguments(sub: Any) -> argparse.ArgumentParser:
    """Register ``run`` and its flags; the caller sets the handler."""
    p: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="run a command in a container (its own D-Bus server)",
        description=(
            "Ask the xdg-containers service on the session bus (starting it if needed) for a "
            "server for this app instance, run COMMAND with DBUS_SESSION_BUS_ADDRESS pointing "
            "at it, and exit with COMMAND's status. The server stops listening when COMMAND "
            "ends."
        ),
        usage="%(prog)s --type T --app-id A [options] -- COMMAND [ARG...]",
    )
    p.add_argument(
        "--type",
        dest="container_type",
        required=True,
        metavar="T",
        help="container type, an interface-like name (org.flatpak)",
    )
    p.add_argument("--app-id", required=True, metavar="A", help="the app's id")
    p.add_argument("--instance-id", metavar="I", help="instance id (default: a random one)")
    p.add_argument(
        "--filter",
        action="store_true",
        help="filter the traffic (xdg-dbus-proxy semantics); default: identify only",
    )
    # The repeatable flags: (flag, value type, metavar, help).
    repeatable: list[tuple[str, Callable[[str], object], str, str]] = [
        ("see", _policy_name, "NAME", "NAME (or prefix.*) may be seen (needs --filter; "
         "repeatable)"),
        ("talk", _policy_name, "NAME", "NAME may be talked to (needs --filter; repeatable)"),
        ("own", _policy_name, "NAME", "NAME may be owned (needs --filter; repeatable)"),
        (
            "call",
            _name_rule,
            "NAME=RULE",
            "allow calls to NAME matching RULE [METHOD][@PATH] (needs --filter)",
        ),
        (
            "broadcast",
            _name_rule,
            "NAME=RULE",
            "receive NAME's broadcasts matching RULE (needs --filter)",
        ),
        ("metadata", _key_value, "KEY=VALUE", "string metadata for the server (repeatable)"),
    ]
    for flag, kind, metavar, text in repeatable:
        p.add_argument(
            f"--{flag}", action="append", default=[], type=kind, metavar=metavar, help=text
        )
    p.add_argument("--log", action="store_true", help="have the service log every message")
    p.add_argument(
        "--sandbox",
        action="store_true",
        help="run COMMAND under bubblewrap with only the minted socket as its bus",
    )
    p.add_argument(
        "--system-bus",
        action="store_true",
        help="also proxy the system bus; sets DBUS_SYSTEM_BUS_ADDRESS",
    )
    p.add_argument(
        "--bus",
        metavar="BUS",
        help="what COMMAND's session bus is proxied to: session, system or an "
        "address (default: the bus the service is on)",
    )
    p.add_argument("--system-bus-address", metavar="ADDR", help=argparse.SUPPRESS)
    p.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command to run, after --"
    )
    return p


# -- named arguments ----------------------------------------------------------------------


def named_arguments(args: argparse.Namespace) -> dict[str, Variant]:
    """AddServer's named arguments for the filter flags (without StopOnNotify and Bus)."""
    out: dict[str, Variant] = {}
    if args.filter:
        out[EXT + "Filter"] = Variant("b", True)
    policy: dict[str, str] = {}
    for level in _LEVEL_FLAGS:  # later levels are higher, so they win
        for name in getattr(args, level):
            policy[name] = level
    if policy:
        out[EXT + "Policy"] = Variant("a{ss}", policy)
    for flag, key in (("call", "Call"), ("broadcast", "Broadcast")):
        rules: dict[str, list[str]] = {}
        for name, rule in getattr(args, flag):
            rules.setdefault(name, []).append(rule)
        if rules:
            out[EXT + key] = Variant("a{sas}", rules)
    if args.log:
        out[EXT + "Log"] = Variant("b", True)
    return out


def check_usage(args: argparse.Namespace) -> str | None:
    """The usage error in ``args`` (naming the flags), or None."""
    if not args.filter:
        for flag in (*_LEVEL_FLAGS, *_RULE_FLAGS):
            if getattr(args, flag):
                return (
                    f"--{flag} requires --filter (without --filter the traffic is only "
                    "identified, not filtered)"
                )
    if not command_of(args):
        return "no COMMAND given (put it after --)"
    return None


def command_of(args: argparse.Namespace) -> list[str]:
    """COMMAND and its arguments, without a leading ``--``."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return command
