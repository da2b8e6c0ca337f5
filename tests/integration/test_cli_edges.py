"""Rough edges a newcomer hit with the command line: output into a reader that left
(``| head``), hints naming options that do not exist, and messages that say what happened
and what to do (issue 17, item 5)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from tests.conftest import REPO, ServiceProcess, add_server, connect, start_service
from tests.integration.test_cli_common import cli, cli_argv, cli_env
from tests.support.bus import PrivateBus

pytestmark = pytest.mark.timeout(180)

RUN = ("run", "--type", "org.example.T", "--app-id", "org.example.App")
#: Servers for a listing far larger than a pipe's 64 KiB buffer.
MANY = 40
FILLER = "x" * 3000


# -- output into a reader that left -----------------------------------------------------


def into_closed_pipe(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``xdg-containers ARGS`` with stdout a pipe whose reader has already gone."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(
            cli_argv(*args), stdout=w, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, env=env or cli_env(), cwd=REPO, timeout=60, check=False,
        )
    finally:
        os.close(w)


def into_head(*args: str) -> tuple[int, str, str]:
    """``xdg-containers ARGS | head -c1`` in bash: (its status as bash shows it, head's
    output, its stderr)."""
    with tempfile.NamedTemporaryFile("r", suffix=".err") as err:
        script = 'set +e; "$@" 2>"$ERR" | head -c1; echo " ${PIPESTATUS[0]}"'
        done = subprocess.run(
            ["bash", "-c", script, "bash", *cli_argv(*args)], capture_output=True, text=True,
            env=cli_env(ERR=err.name), cwd=REPO, timeout=60, check=True,
        )
        head, status = done.stdout.rsplit(" ", 1)
        return int(status), head, err.read()


@pytest.fixture
async def many_servers(service: ServiceProcess, manager_bus: MessageBus) -> list[str]:
    """MANY servers with big metadata (``list --json`` prints ~150 KiB)."""
    paths = []
    for i in range(MANY):
        path, _ = await add_server(
            manager_bus, instance_id=f"i-{i}", metadata={"org.example.Pad": Variant("s", FILLER)}
        )
        paths.append(path)
    return paths


async def test_output_into_a_reader_that_left_ends_quietly(
    many_servers: list[str], manager_bus: MessageBus, runtime_dir: str
) -> None:
    """Every command printing output, when its reader has gone, dies of SIGPIPE the way
    coreutils do (the shell shows 141) with nothing on stderr: no BrokenPipeError
    traceback; ``| head -c1`` on a large listing included."""
    # (--json, as the listing must outgrow the pipe's buffer for head to leave first.)
    status, head, err = await asyncio.to_thread(into_head, "list", "--json")
    assert (status, head, err) == (128 + signal.SIGPIPE, "[", "")

    first = many_servers[0]
    info = await cli("info", first, "--json")
    app = await connect(json.loads(info.stdout)["Address"])
    try:
        commands = [
            ("list",), ("list", "--json"), ("info", first), ("info", first, "--json"),
            ("identify", app.unique_name), ("identify", app.unique_name, "--json"),
            ("--help",), ("run", "--help"),
        ]
        # Both ways Python may write stdout: through its buffer (EPIPE at the flush) and
        # unbuffered (EPIPE at the write).
        for turn, unbuffered in enumerate(("1", None)):
            env = cli_env(PYTHONUNBUFFERED=unbuffered)
            stop = ("stop", "--listening-only", many_servers[-1 - turn])
            for argv in [*commands, stop]:
                r = await asyncio.to_thread(into_closed_pipe, *argv, env=env)
                # --help: argparse ignores a failed write of its text, so an unbuffered
                # --help may end 0; never with a message.
                allowed = {-signal.SIGPIPE, 0} if "--help" in argv else {-signal.SIGPIPE}
                assert r.returncode in allowed and r.stderr == "", (argv, unbuffered, r)
    finally:
        app.disconnect()


def test_serve_private_with_nobody_reading_stops_its_bus(tmp_path: str) -> None:
    """``serve --private`` prints the bus address on stdout: with nobody to read it, the
    bus it started is stopped (nobody could use it) and it ends as quietly."""
    r = into_closed_pipe("serve", "--private", env=cli_env(TMPDIR=str(tmp_path)))
    assert r.returncode == -signal.SIGPIPE
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert list(processes_mentioning(str(tmp_path))) == []


def processes_mentioning(text: str) -> Iterator[int]:
    """Pids whose command line contains ``text``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if text.encode() in fh.read():
                    yield int(entry)
        except OSError:
            continue


# -- hints name only what exists ----------------------------------------------------------

_QUOTED = re.compile(r"'xdg-containers ([a-z]+)([^']*)'")
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def _help(*command: str) -> str:
    """``xdg-containers COMMAND --help``."""
    done = subprocess.run(
        cli_argv(*command, "--help"), capture_output=True, text=True, env=cli_env(),
        cwd=REPO, timeout=60, check=True,
    )
    return done.stdout


def _has_option(help_text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text) is not None


def assert_hints_exist(command: str, message: str) -> None:
    """Every option ``message`` names exists: bare ones in ``command``'s --help, those of a
    quoted ``'xdg-containers SUB ...'`` in SUB's (and SUB is a command)."""
    commands = _help()
    for sub, rest in _QUOTED.findall(message):
        assert _has_option(commands, sub), f"{sub!r} is not a command: {message}"
        sub_help = _help(sub)
        for option in _OPTION.findall(rest):
            assert _has_option(sub_help, option), f"{sub} has no {option}: {message}"
    own_help = _help(command)
    for option in _OPTION.findall(_QUOTED.sub("", message)):
        assert _has_option(own_help, option), f"{command} has no {option}: {message}"


@pytest.fixture
def no_session_bus(tmp_path: str) -> dict[str, str]:
    """An environment without any session bus (nor $XDG_RUNTIME_DIR/bus)."""
    return cli_env(DBUS_SESSION_BUS_ADDRESS=None, XDG_RUNTIME_DIR=str(tmp_path))


async def test_run_without_a_session_bus_names_what_to_set(
    no_session_bus: dict[str, str],
) -> None:
    """run has no bus flags: it says to set DBUS_SESSION_BUS_ADDRESS, and names no
    --address/--system (admin-only flags it suggested before)."""
    r = await cli(*RUN, "--", "true", env=no_session_bus)
    assert r.returncode == 125, r.stderr
    assert "no session bus" in r.stderr and "set DBUS_SESSION_BUS_ADDRESS" in r.stderr
    assert "COMMAND not started" in r.stderr
    assert "--address" not in r.stderr and "--system " not in r.stderr
    assert_hints_exist("run", r.stderr)


async def test_admin_and_serve_without_a_session_bus(no_session_bus: dict[str, str]) -> None:
    """list names its own bus flags; serve --session names --address and --private."""
    r = await cli("list", env=no_session_bus)
    assert r.returncode == 4 and "--address ADDR" in r.stderr and "--system" in r.stderr
    assert_hints_exist("list", r.stderr)
    r = await cli("serve", "--session", env=no_session_bus)
    assert r.returncode == 2 and "--private" in r.stderr and "--address" in r.stderr
    assert_hints_exist("serve", r.stderr)


async def test_not_running_says_how_to_start_it(bus: PrivateBus) -> None:
    """Admin views on a bus without the service, and run with nothing to activate: what
    to start, with options that exist."""
    r = await cli("list")
    assert r.returncode == 3 and "xdg-containers is not running on this bus" in r.stderr
    assert "'xdg-containers serve'" in r.stderr
    assert_hints_exist("list", r.stderr)
    r = await cli(*RUN, "--", "true")
    assert r.returncode == 125
    assert "start it with 'xdg-containers serve'" in r.stderr
    assert "org.freedesktop.DBus.Containers1.service" in r.stderr
    assert_hints_exist("run", r.stderr)


async def test_service_refusals_say_what_to_do(
    service_factory: Any, manager_bus: MessageBus, tmp_path: str
) -> None:
    """AddServer refusals name the error and what the user can change."""
    service_factory("--limit", "max_servers=1")
    await add_server(manager_bus)
    marker = os.path.join(tmp_path, "ran")
    r = await cli(*RUN, "--", "touch", marker)
    assert r.returncode == 125 and not os.path.exists(marker)
    assert "AddServer failed: LimitsExceeded" in r.stderr, r.stderr
    assert "'xdg-containers stop PATH'" in r.stderr and "--limit" in r.stderr
    assert_hints_exist("run", r.stderr)
    r = await cli("run", "--type", "not-a-type", "--app-id", "a", "--", "true")
    assert r.returncode == 125 and "AddServer failed: InvalidArgs" in r.stderr
    assert "'xdg-containers run --help'" in r.stderr
    assert_hints_exist("run", r.stderr)


# -- what happened, and what to do ----------------------------------------------------------


async def test_admin_messages_say_what_to_do(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    """A wrong path, a gone server, a name nobody owns: each says so and what to try."""
    r = await cli("info", "c99")
    assert r.returncode == 1 and "no such server: /org/freedesktop/DBus/Containers1/c99" in r.stderr
    assert "'xdg-containers list' shows the live ones" in r.stderr
    r = await cli("stop", "c99")
    assert r.returncode == 1 and "removed already?" in r.stderr
    r = await cli("info", "not/a/path")
    assert r.returncode == 2 and "give a server's path" in r.stderr and " cN" in r.stderr
    r = await cli("identify", ":1.9999")
    assert r.returncode == 1 and "no connection named :1.9999" in r.stderr
    assert "it has left, or the name is misspelt" in r.stderr
    r = await cli("identify", manager_bus.unique_name)
    assert r.returncode == 1 and "is not a container connection" in r.stderr
    assert "did not connect through a socket of this service" in r.stderr
    assert_hints_exist("identify", r.stderr)


async def test_run_command_problems(service: ServiceProcess, tmp_path: str) -> None:
    """A missing or non-executable COMMAND: which, and what to check."""
    r = await cli(*RUN, "--", "no-such-command-here")
    assert r.returncode == 127 and "command not found in PATH" in r.stderr
    script = os.path.join(tmp_path, "script")
    with open(script, "w") as fh:
        fh.write("#!/bin/sh\n")
    r = await cli(*RUN, "--", script)
    assert r.returncode == 126 and f"cannot run {script}: Permission denied" in r.stderr
    assert "execute permission" in r.stderr


def test_service_start_and_stop_lines(bus: PrivateBus, runtime_dir: str) -> None:
    """The service says why it cannot start (the bus, the name taken) and how it stopped."""
    r = subprocess.run(
        cli_argv("serve", "--address", f"unix:path={runtime_dir}/no-bus-here"),
        capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=60, check=False,
    )
    assert r.returncode == 1
    assert f"cannot connect to unix:path={runtime_dir}/no-bus-here" in r.stderr
    assert "is the bus running" in r.stderr
    address = bus.address
    first = start_service(address, runtime_dir)
    try:
        second = subprocess.run(
            cli_argv("serve", "--address", address), capture_output=True, text=True,
            env=cli_env(), cwd=REPO, timeout=60, check=False,
        )
        assert second.returncode == 3
        assert "already owned on this bus: another xdg-containers" in second.stderr
        assert "'xdg-containers list'" in second.stderr
        assert_hints_exist("serve", second.stderr)
    finally:
        assert first.terminate() == 0
    log = first.log()
    os.unlink(first.log_path)
    assert "stopping on SIGTERM/SIGINT: closing every server and removing its socket" in log
