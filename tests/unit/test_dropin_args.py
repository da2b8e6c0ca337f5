"""The drop-in's command line, as xdg-dbus-proxy's dbus-proxy.c parses it (SPEC 11)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import pytest
from dbus_fast import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.dbusfast import unmarshaller
from xdg_containers.dropin.args import (
    ArgsError,
    EarlyExit,
    Group,
    name_problem,
    parse,
    rule_problem,
    split_args_data,
)
from xdg_containers.dropin.backed import add_server_message, named_arguments
from xdg_containers.dropin.identity import (
    FLATPAK_TYPE,
    NEUTRAL_TYPE,
    Identity,
    identity_from_keyfile,
    read_identity,
)
from xdg_containers.policy import PolicyError, parse_rule, policy_from_named_arguments

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADDR = "unix:path=/run/user/0/bus,guid=0123456789abcdef0123456789abcdef"


def _no_fd(fd: int) -> bytes:
    raise AssertionError(f"unexpected read of fd {fd}")


def test_flatpak_command_line_through_args_fd() -> None:
    """flatpak's shape: --fd and --args outside, the whole group inside the memfd."""
    data = b"\0".join([
        ADDR.encode(), b"/run/user/0/.dbus-proxy/session-bus-proxy-AbC123", b"--filter",
        b"--own=org.example.App.*", b"--talk=org.example.Talk", b"--see=org.example.See",
        b"--call=org.freedesktop.portal.*=*",
        b"--broadcast=org.freedesktop.portal.*=@/org/freedesktop/portal/*", b"--log",
    ]) + b"\0"
    opts = parse(["--fd=37", "--args=38"], lambda fd: data if fd == 38 else b"")
    assert opts.sync_fd == 37
    (g,) = opts.groups
    assert (g.address, g.path, g.filter, g.log) == (
        ADDR, "/run/user/0/.dbus-proxy/session-bus-proxy-AbC123", True, True)
    assert g.policy() == {"org.example.App.*": "own", "org.example.Talk": "talk",
                          "org.example.See": "see"}
    assert g.rules("call") == {"org.freedesktop.portal.*": ["*"]}
    assert g.rules("broadcast") == {"org.freedesktop.portal.*": ["@/org/freedesktop/portal/*"]}


def test_several_groups_and_generic_options_inside_a_group() -> None:
    """Each ADDRESS PATH starts a group; --fd/--args may appear among a group's options
    and what --args reads continues that group."""
    opts = parse(
        ["A", "P", "--filter", "--args=5", "B", "Q", "--sloppy-names", "--fd=3"],
        lambda fd: b"--see=org.a\0--talk=org.a",
    )
    assert opts.sync_fd == 3
    a, b = opts.groups
    assert (a.address, a.path, a.filter, a.policy()) == ("A", "P", True, {"org.a": "talk"})
    assert (b.address, b.path, b.sloppy_names, b.filter) == ("B", "Q", True, False)


def test_levels_add_up_highest_wins() -> None:
    """--own then --see for one name: own (several rules add up)."""
    g = Group("A", "P", levels=[("own", "org.x"), ("see", "org.x"), ("talk", "org.y.*")])
    assert g.policy() == {"org.x": "own", "org.y.*": "talk"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--frobnicate"], "Unknown argument --frobnicate"),
        (["A"], "No socket path given"),
        (["A", "--filter"], "No socket path given"),
        (["--fd=3"], "No proxies specified"),
        (["--fd=x", "A", "P"], "Invalid fd x"),
        (["--fd=-1", "A", "P"], "Invalid fd -1"),
        (["--args=z"], "Invalid --args fd z"),
        (["A", "P", "--see=:1.5"], "':1.5' is not a valid dbus name"),
        (["A", "P", "--talk=org..x"], "'org..x' is not a valid dbus name"),
        (["A", "P", "--own=*"], "'*' is not a valid dbus name"),
        (["A", "P", "--call=org.x"], "'org.x' is not a valid name + rule"),
        (["A", "P", "--call=org.x=@nopath"], "is not a valid name + rule"),
        (["A", "P", "--broadcast=1bad=*"], "is not a valid name + rule"),
        (["A", "P", "--filter", "--bogus"], "Unknown argument --bogus"),
    ],
)
def test_errors_as_xdg_dbus_proxy(argv: list[str], message: str) -> None:
    """Every refusal raises ArgsError (exit 1 before the sync byte) with upstream's words."""
    with pytest.raises(ArgsError, match=None) as info:
        parse(argv, _no_fd)
    assert message in str(info.value)


def test_args_fd_read_failure() -> None:
    """An unreadable --args fd is upstream's 'Failed to load --args'."""

    def broken(fd: int) -> bytes:
        raise OSError(9, "Bad file descriptor")

    with pytest.raises(ArgsError, match="Failed to load --args: Bad file descriptor"):
        parse(["--args=99"], broken)


def test_help_version_and_no_arguments() -> None:
    """--help (stdout, 0), --version (0), no arguments (usage on stderr, 1)."""
    with pytest.raises(EarlyExit) as info:
        parse(["--help"], _no_fd)
    assert info.value.code == 0 and "--args=FD" in info.value.text and not info.value.to_stderr
    with pytest.raises(EarlyExit) as info:
        parse(["A", "P", "--version"], _no_fd)
    assert info.value.code == 0 and "xdg-containers-dbus-proxy" in info.value.text
    with pytest.raises(EarlyExit) as info:
        parse([], _no_fd)
    assert info.value.code == 1 and info.value.to_stderr


def test_split_args_data() -> None:
    """A trailing NUL adds no empty argument; inner empty ones are kept; no NUL at all
    is one argument."""
    assert split_args_data(b"a\0b\0") == ["a", "b"]
    assert split_args_data(b"a\0\0b") == ["a", "", "b"]
    assert split_args_data(b"a") == ["a"]
    assert split_args_data(b"") == []


INFO = """[Application]
name=org.example.App
runtime=runtime/org.example.Platform/x86_64/1

[Instance]
instance-id=4191104120
branch=1
arch=x86_64
app-commit=991c
"""


def test_identity_from_flatpak_info() -> None:
    """org.flatpak, [Application] name, [Instance] instance-id, runtime/branch/arch."""
    ident = identity_from_keyfile(INFO, "/proc/7/root/.flatpak-info")
    assert (ident.container_type, ident.app_id, ident.instance_id) == (
        FLATPAK_TYPE, "org.example.App", "4191104120")
    assert ident.metadata == {
        "org.flatpak.InfoPath": "/proc/7/root/.flatpak-info",
        "org.flatpak.Runtime": "runtime/org.example.Platform/x86_64/1",
        "org.flatpak.Branch": "1",
        "org.flatpak.Arch": "x86_64",
        "org.flatpak.AppCommit": "991c",
    }


def test_identity_without_flatpak_info(tmp_path: object) -> None:
    """No identity file: the neutral type with empty ids."""
    ident = read_identity(1, "/nonexistent/.flatpak-info")
    assert ident == Identity(NEUTRAL_TYPE, "", "", {})


def test_add_server_message_unmarshals() -> None:
    """The hand-built AddServer is what dbus-fast reads back: triple, metadata, the
    translated policy, ListenFD/Connector handles, Bus and two fds declared."""
    g = Group(ADDR, "P", filter=True, levels=[("talk", "org.a"), ("own", "org.b.*")],
              calls=[("org.c", "org.c.I.M@/p/*"), ("org.c", "*")],
              broadcasts=[("org.d", "@/d")])
    ident = identity_from_keyfile(INFO, "/proc/7/root/.flatpak-info")
    raw = add_server_message(5, ident, g)
    msg = unmarshaller(io.BytesIO(raw)).unmarshall()
    assert isinstance(msg, Message)
    assert (msg.member, msg.destination, msg.signature, msg.serial) == (
        "AddServer", "org.freedesktop.DBus.Containers1", "sssa{sv}a{sv}", 5)
    ctype, app, inst, meta, named = msg.body
    assert (ctype, app, inst) == ("org.flatpak", "org.example.App", "4191104120")
    assert meta["org.flatpak.Runtime"].value == "runtime/org.example.Platform/x86_64/1"
    values = {k: (v.signature, v.value) for k, v in named.items()}
    ext = "org.freedesktop.XdgContainers1."
    assert values["StopOnDisconnect"] == ("b", True)
    assert values[ext + "Filter"] == ("b", True)
    assert values[ext + "Bus"] == ("s", ADDR)
    assert values[ext + "Policy"] == ("a{ss}", {"org.a": "talk", "org.b.*": "own"})
    assert values[ext + "Call"] == ("a{sas}", {"org.c": ["org.c.I.M@/p/*", "*"]})
    assert values[ext + "Broadcast"] == ("a{sas}", {"org.d": ["@/d"]})
    assert values[ext + "ListenFD"][0] == "h" and values[ext + "Connector"][0] == "h"


def test_policy_without_filter_is_not_sent() -> None:
    """xdg-dbus-proxy ignores --see etc. without --filter: no Policy for the service
    (which would refuse it), so the server is unfiltered as upstream's proxy is."""
    named = named_arguments(Group("A", "P", levels=[("talk", "org.a")]))
    assert not any(k.endswith(("Filter", "Policy", "Call", "Broadcast")) for k in named)


_RULE_ALPHABET = st.sampled_from([*"ab.*@/_-:1 ", "org.x", "I.M", "@/p/*", "/*"])


def engine_accepts(check: Callable[[], object]) -> bool:
    """True unless the policy engine's ``check`` raises PolicyError."""
    try:
        check()
    except PolicyError:
        return False
    return True


@given(st.lists(_RULE_ALPHABET, max_size=8).map("".join))
@settings(max_examples=400, deadline=None)
def test_rule_check_agrees_with_the_policy_engine(rule: str) -> None:
    """args.py checks rules without importing the policy engine (start-up time); it must
    accept exactly what policy/rules.py accepts, so the service never refuses what the
    command line let through."""
    engine_ok = engine_accepts(lambda: parse_rule(rule))
    assert (rule_problem(rule) is None) == engine_ok, rule


@given(st.lists(_RULE_ALPHABET, max_size=8).map("".join))
@settings(max_examples=400, deadline=None)
def test_name_check_agrees_with_the_policy_engine(key: str) -> None:
    """The same for --see/--talk/--own names and the NAME of --call/--broadcast."""
    engine_ok = engine_accepts(lambda: policy_from_named_arguments({key: "see"}, {}, {}))
    assert (name_problem(key) is None) == engine_ok, key


@pytest.mark.parametrize(
    "rule", ["", "*", "@/*", "org.x.*", "org.x.M@/a/b", "@/a/*", "org.x.M@/", "@", "@//*",
             "org.x", "org.x.*@/a/", "org..x.M", "org.x.1M", ".M"],
)
def test_rule_check_examples(rule: str) -> None:
    """Hand-picked rules, valid and not, agree with the engine too."""
    engine_ok = engine_accepts(lambda: parse_rule(rule))
    assert (rule_problem(rule) is None) == engine_ok, rule


def test_start_up_imports_stay_small() -> None:
    """The path to the sync byte imports no dataclasses, asyncio, dbus-fast nor the policy
    engine (a fresh interpreter, as flatpak starts it)."""
    import subprocess
    import sys

    code = (
        "import sys; import xdg_containers.dropin.main as m; "
        "bad = [n for n in ('dataclasses', 'asyncio', 'dbus_fast', 'xdg_containers.policy',"
        " 'inspect', 'logging') if n in sys.modules]; print(bad)"
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, "
                           f"{REPO!r}); {code}"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
