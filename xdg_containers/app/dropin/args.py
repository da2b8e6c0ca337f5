"""The drop-in's command line, parsed as xdg-dbus-proxy's ``dbus-proxy.c`` does (pure).

``[--fd=FD] [--args=FD] ADDRESS PATH [OPTIONS...] [ADDRESS PATH [OPTIONS...]]...``:
options before the first ADDRESS are generic (``--fd``, ``--args``, ``--help``,
``--version``); after each ADDRESS PATH come that group's proxy options, and
generic options may appear there too. ``--args=FD`` reads NUL-separated
arguments from FD and inserts them right after itself, so they continue
whatever group was being parsed. Names and rules are checked here, before any
socket exists, with the same rules the service applies (policy/rules.py;
``tests/unit/test_dropin_args.py`` checks the two agree). This module is on the
start-up path, before the sync byte: it imports only ``re`` (through
wire/names.py), no dataclasses and no policy engine.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from xdg_containers.wire.names import (
    is_valid_interface_name,
    is_valid_member_name,
    is_valid_object_path,
    is_valid_well_known_name,
)

VERSION = "0.1.0"
PROGRAM = "xdg-containers-dbus-proxy"

USAGE = """usage: {argv0} [OPTIONS...] [ADDRESS PATH [OPTIONS...] ...]

Options:
    --help                       Print this help
    --version                    Print version
    --fd=FD                      Stop when FD is closed
    --args=FD                    Read arguments from FD

Proxy Options:
    --filter                     Enable filtering
    --log                        Turn on logging
    --sloppy-names               Report name changes for unique names
    --see=NAME                   Set 'see' policy for NAME
    --talk=NAME                  Set 'talk' policy for NAME
    --own=NAME                   Set 'own' policy for NAME
    --call=NAME=RULE             Set RULE for calls on NAME
    --broadcast=NAME=RULE        Set RULE for broadcasts from NAME
"""

_LEVELS = {"see": 0, "talk": 1, "own": 2}
# strtol's syntax as dbus-proxy.c accepts it: optional blanks and sign, then digits only.
_FD_TEXT = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")


class ArgsError(Exception):
    """A command line xdg-dbus-proxy would refuse: print the message, exit 1."""


class EarlyExit(Exception):
    """``--help``/``--version`` (or no arguments): print ``text`` to stdout or stderr, exit."""

    def __init__(self, text: str, code: int, to_stderr: bool = False) -> None:
        """``code`` is the exit status."""
        super().__init__(text)
        self.text = text
        self.code = code
        self.to_stderr = to_stderr


class Group:
    """One ADDRESS PATH group: a proxied bus and the socket to serve it on."""

    def __init__(
        self,
        address: str,
        path: str,
        *,
        filter: bool = False,
        log: bool = False,
        sloppy_names: bool = False,
        levels: list[tuple[str, str]] | None = None,
        calls: list[tuple[str, str]] | None = None,
        broadcasts: list[tuple[str, str]] | None = None,
    ) -> None:
        """``levels`` are (level word, name or ``prefix.*``) in command-line order."""
        self.address = address
        self.path = path
        self.filter = filter
        self.log = log
        self.sloppy_names = sloppy_names
        self.levels = levels if levels is not None else []
        self.calls = calls if calls is not None else []
        self.broadcasts = broadcasts if broadcasts is not None else []

    def __repr__(self) -> str:
        return f"Group({self.address!r}, {self.path!r}, filter={self.filter})"

    def policy(self) -> dict[str, str]:
        """``--see/--talk/--own`` as the Policy argument: several rules add up, the
        highest wins (as in xdg-dbus-proxy)."""
        out: dict[str, str] = {}
        for word, name in self.levels:
            old = out.get(name)
            if old is None or _LEVELS[word] > _LEVELS[old]:
                out[name] = word
        return out

    def rules(self, which: str) -> dict[str, list[str]]:
        """``--call`` (``which="call"``) or ``--broadcast`` rules by name, in order."""
        out: dict[str, list[str]] = {}
        for name, rule in self.calls if which == "call" else self.broadcasts:
            out.setdefault(name, []).append(rule)
        return out


class Options:
    """The whole command line."""

    def __init__(self, sync_fd: int | None, groups: list[Group]) -> None:
        """``sync_fd`` is ``--fd``'s value, if given."""
        self.sync_fd = sync_fd
        self.groups = groups


def _fd_number(text: str, what: str) -> int:
    if not _FD_TEXT.fullmatch(text) or int(text) < 0:
        raise ArgsError(f"Invalid {what}{text}")
    return int(text)


def name_problem(key: str) -> str | None:
    """Why ``key`` (a well-known name or ``prefix.*``) is no policy key, or None."""
    name = key[:-2] if key.endswith(".*") else key
    if name.startswith(":") or not is_valid_well_known_name(name):
        return f"'{name}' is not a valid dbus name"
    return None


def rule_problem(rule: str) -> str | None:
    """Why ``rule`` is no ``[METHOD][@PATH]`` rule, or None (policy/rules.py's syntax)."""
    method, at, path = rule.partition("@")
    if at and path != "/*":
        base = path[:-2] if path.endswith("/*") else path
        if (path.endswith("/*") and base == "/") or not is_valid_object_path(base):
            return f"'{path}' is not an object path or 'path/*' subtree"
    if method in ("", "*"):
        return None
    interface, dot, member = method.rpartition(".")
    if not dot:
        return f"method '{method}' is not '*', 'interface.*' or 'interface.Member'"
    if not is_valid_interface_name(interface):
        return f"'{interface}' is not a valid interface name"
    if member != "*" and not is_valid_member_name(member):
        return f"'{member}' is not a valid member name"
    return None


def _parse_name(text: str) -> str:
    """``--see/--talk/--own``'s NAME: a well-known name or ``prefix.*``."""
    problem = name_problem(text)
    if problem is not None:
        raise ArgsError(problem)
    return text


def _parse_name_rule(text: str) -> tuple[str, str]:
    name, eq, rule = text.partition("=")
    if not eq:
        raise ArgsError(f"'{text}' is not a valid name + rule")
    problem = name_problem(name) or rule_problem(rule)
    if problem is not None:
        raise ArgsError(f"'{text}' is not a valid name + rule: {problem}")
    return name, rule


def split_args_data(data: bytes) -> list[str]:
    """NUL-separated arguments; a trailing NUL ends the last one (adds no empty one)."""
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def parse(argv: list[str], read_fd: Callable[[int], bytes], argv0: str = PROGRAM) -> Options:
    """Parse ``argv`` (without the program name); ``read_fd`` reads all of an ``--args`` fd."""
    if not argv:
        raise EarlyExit(USAGE.format(argv0=argv0), 1, to_stderr=True)
    args = list(argv)
    state: dict[str, int | None] = {"sync_fd": None}
    groups: list[Group] = []

    def generic(i: int) -> int:
        arg = args[i]
        if arg == "--help":
            raise EarlyExit(USAGE.format(argv0=argv0), 0)
        if arg == "--version":
            raise EarlyExit(f"{PROGRAM} {VERSION}\n", 0)
        if arg.startswith("--fd="):
            state["sync_fd"] = _fd_number(arg[5:], "fd ")
            return i + 1
        if arg.startswith("--args="):
            fd = _fd_number(arg[7:], "--args fd ")
            try:
                data = read_fd(fd)
            except OSError as exc:
                raise ArgsError(f"Failed to load --args: {exc.strerror or exc}") from None
            args[i + 1 : i + 1] = split_args_data(data)
            return i + 1
        raise ArgsError(f"Unknown argument {arg}")

    def group(i: int) -> int:
        if i >= len(args) or args[i].startswith("-"):
            raise ArgsError("No bus address given")
        address = args[i]
        i += 1
        if i >= len(args) or args[i].startswith("-"):
            raise ArgsError("No socket path given")
        g = Group(address, args[i])
        i += 1
        while i < len(args) and args[i].startswith("-"):
            arg = args[i]
            if arg.startswith(("--see=", "--talk=", "--own=")):
                word, _, name = arg[2:].partition("=")
                g.levels.append((word, _parse_name(name)))
            elif arg.startswith("--call="):
                g.calls.append(_parse_name_rule(arg[7:]))
            elif arg.startswith("--broadcast="):
                g.broadcasts.append(_parse_name_rule(arg[12:]))
            elif arg == "--log":
                g.log = True
            elif arg == "--filter":
                g.filter = True
            elif arg == "--sloppy-names":
                g.sloppy_names = True
            else:
                i = generic(i)
                continue
            i += 1
        groups.append(g)
        return i

    i = 0
    while i < len(args):
        i = generic(i) if args[i].startswith("-") else group(i)
    if not groups:
        raise ArgsError("No proxies specified")
    return Options(state["sync_fd"], groups)


def read_all(fd: int) -> bytes:
    """Everything readable from ``fd`` until EOF (the memfd flatpak passes with --args)."""
    import os

    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
