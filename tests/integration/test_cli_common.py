"""Helpers for the command-line tests (``test_cli_*.py``), and checks of the CLI's pure parts.

The helpers run ``python -m xdg_containers`` as a user would, and start small
D-Bus client processes (through a minted socket, or inside a sandbox) that
report what they saw as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from tests.conftest import IFACE, NAME, PATH, REPO, call, ok
from tests.integration import helpers_c1
from tests.support.names import EXT, PROPS, SERVER_IFACE
from xdg_containers.cli import build_parser
from xdg_containers.launcher_args import check_usage, command_of, named_arguments

DRIVER = "org.freedesktop.DBus"
DRIVER_PATH = "/org/freedesktop/DBus"

#: A D-Bus client for tests: connects to argv[1] (or $DBUS_SESSION_BUS_ADDRESS), reports
#: its unique name, pid, GetConnectionInfo about itself, ListNames and GetId as one JSON
#: line, then (with --wait FILE) waits for FILE to appear. --try ADDR reports whether
#: connecting to ADDR works; --system also reports GetId on $DBUS_SYSTEM_BUS_ADDRESS.
CLIENT = textwrap.dedent(
    """
    import argparse, asyncio, json, os, sys, time
    sys.path.insert(0, REPO)
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    def driver(member, sig="", body=()):
        return Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                       interface="org.freedesktop.DBus", member=member, signature=sig,
                       body=list(body))

    async def main():
        p = argparse.ArgumentParser()
        p.add_argument("--address")
        p.add_argument("--try", dest="tries", action="append", default=[])
        p.add_argument("--system", action="store_true")
        p.add_argument("--wait")
        a = p.parse_args()
        out = {"pid": os.getpid(), "env": os.environ.get("DBUS_SESSION_BUS_ADDRESS"),
               "system_env": os.environ.get("DBUS_SYSTEM_BUS_ADDRESS"),
               "runtime": sorted(os.listdir(os.environ["XDG_RUNTIME_DIR"]))
               if os.environ.get("XDG_RUNTIME_DIR") else None}
        out["tries"] = {}
        for addr in a.tries:
            try:
                b = await asyncio.wait_for(MessageBus(bus_address=addr).connect(), 5)
                out["tries"][addr] = "connected"
                b.disconnect()
            except Exception as exc:
                out["tries"][addr] = "failed: %s" % type(exc).__name__
        bus = await MessageBus(bus_address=a.address or os.environ["DBUS_SESSION_BUS_ADDRESS"],
                               negotiate_unix_fd=True).connect()
        out["unique_name"] = bus.unique_name
        r = await bus.call(Message(destination="org.freedesktop.DBus.Containers1",
                                   path="/org/freedesktop/DBus/Containers1",
                                   interface="org.freedesktop.DBus.Containers1",
                                   member="GetConnectionInfo", signature="s",
                                   body=[bus.unique_name]))
        if r.message_type == MessageType.ERROR:
            out["info"] = {"error": r.error_name}
        else:
            path, creator, ctype, app, inst, md = r.body
            out["info"] = {"path": path, "type": ctype, "app_id": app, "instance_id": inst,
                           "metadata": {k: v.value for k, v in md.items()}}
        out["names"] = (await bus.call(driver("ListNames"))).body[0]
        out["bus_id"] = (await bus.call(driver("GetId"))).body[0]
        if a.system:
            sb = await MessageBus(bus_address=os.environ["DBUS_SYSTEM_BUS_ADDRESS"]).connect()
            out["system_bus_id"] = (await sb.call(driver("GetId"))).body[0]
            sb.disconnect()
        print(json.dumps(out), flush=True)
        if a.wait:
            while not os.path.exists(a.wait):
                await asyncio.sleep(0.02)
        bus.disconnect()

    asyncio.run(main())
    """
).replace("REPO", repr(REPO))


def read_text(path: str) -> str:
    """A file's contents."""
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def cli_env(**overrides: str | None) -> dict[str, str]:
    """The test's environment with the repo importable; None values are removed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def cli_argv(*args: str) -> list[str]:
    """``xdg-containers ARGS`` as run from the checkout."""
    return [sys.executable, "-m", "xdg_containers", *args]


def cli_sync(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``xdg-containers ARGS`` and wait for it."""
    return subprocess.run(
        cli_argv(*args),
        capture_output=True,
        text=True,
        env=env or cli_env(),
        cwd=REPO,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


async def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``xdg-containers ARGS`` in a thread, so the test's own connections stay served."""
    return await asyncio.to_thread(cli_sync, *args, env=env, timeout=timeout)


def client_argv(*args: str) -> list[str]:
    """The test client (CLIENT) with its arguments."""
    return [sys.executable, "-c", CLIENT, *args]


def start_client(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start the test client in the background (stdout piped)."""
    return subprocess.Popen(
        client_argv(*args), stdout=subprocess.PIPE, text=True, env=env or cli_env(), cwd=REPO
    )


async def read_report(proc: subprocess.Popen[str], timeout: float = 20) -> dict[str, Any]:
    """The JSON line a client (or a launcher running one) prints."""
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    assert line, f"client printed nothing (exit {proc.poll()})"
    report: dict[str, Any] = json.loads(line)
    return report


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The client's JSON report in a finished run's stdout."""
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, (
        f"no report; rc={result.returncode} stdout={result.stdout!r} stderr={result.stderr!r}"
    )
    report: dict[str, Any] = json.loads(lines[-1])
    return report


async def driver_call(
    bus: MessageBus, member: str, signature: str = "", body: list[Any] | None = None
) -> list[Any]:
    """A successful bus-driver call's body."""
    return ok(await helpers_c1.driver_call(bus, member, signature, body))


async def list_servers(bus: MessageBus) -> list[str]:
    """ListServers()."""
    return list(ok(await call(bus, "ListServers"))[0])


async def server_property(bus: MessageBus, path: str, name: str) -> Any:
    """One property of a server object (raises AssertionError if it is gone)."""
    reply = await call(bus, "Get", "ss", [SERVER_IFACE, name], path=path, interface=PROPS)
    return ok(reply)[0].value


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """Poll an async predicate until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class RemovedWatcher:
    """Collects ServerRemoved signals on one connection."""

    def __init__(self, bus: MessageBus) -> None:
        """Watch on ``bus``; call ``start()``."""
        self.bus = bus
        self.removed: list[str] = []

    async def start(self) -> RemovedWatcher:
        """Subscribe to ServerRemoved."""
        self.bus.add_message_handler(self._on_message)
        rule = (
            f"type='signal',sender='{NAME}',path='{PATH}',interface='{IFACE}',"
            "member='ServerRemoved'"
        )
        await driver_call(self.bus, "AddMatch", "s", [rule])
        return self

    def _on_message(self, msg: Message) -> None:
        """Record ServerRemoved."""
        if msg.message_type == MessageType.SIGNAL and msg.member == "ServerRemoved":
            self.removed.append(msg.body[0])

    async def wait_removed(self, path: str, timeout: float = 5.0) -> None:
        """Wait for ServerRemoved(path)."""
        deadline = time.monotonic() + timeout
        while path not in self.removed:
            if time.monotonic() > deadline:
                raise AssertionError(f"no ServerRemoved({path}); got {self.removed}")
            await asyncio.sleep(0.02)


# -- the parser and the named arguments (no bus needed) ------------------------------------


def parse_run(*argv: str) -> argparse.Namespace:
    """Parse a ``run`` command line."""
    return build_parser().parse_args(["run", *argv])


def test_run_flags_become_named_arguments() -> None:
    """Every filter flag maps to its named argument; levels merge, rules accumulate."""
    args = parse_run(
        "--type",
        "org.example.T",
        "--app-id",
        "org.example.App",
        "--filter",
        "--see",
        "org.example.A",
        "--talk",
        "org.example.B.*",
        "--own",
        "org.example.C",
        "--see",
        "org.example.C",
        "--call",
        "org.example.B=org.example.B.Get@/b",
        "--call",
        "org.example.B=*@/x/*",
        "--call",
        "org.example.D=",
        "--broadcast",
        "org.example.B=org.example.B.Changed",
        "--log",
        "--",
        "sh",
        "-c",
        "true",
    )
    assert check_usage(args) is None
    assert command_of(args) == ["sh", "-c", "true"]
    named = named_arguments(args)
    assert named[EXT + "Filter"] == Variant("b", True)
    assert named[EXT + "Log"] == Variant("b", True)
    # the highest level given for a name wins
    assert named[EXT + "Policy"] == Variant(
        "a{ss}", {"org.example.A": "see", "org.example.B.*": "talk", "org.example.C": "own"}
    )
    # several rules for one name accumulate, in order
    assert named[EXT + "Call"] == Variant(
        "a{sas}", {"org.example.B": ["org.example.B.Get@/b", "*@/x/*"], "org.example.D": [""]}
    )
    assert named[EXT + "Broadcast"] == Variant(
        "a{sas}", {"org.example.B": ["org.example.B.Changed"]}
    )


def test_run_without_filter_sends_no_filter_arguments() -> None:
    """Without --filter nothing filter-related is sent; a bare COMMAND works without --."""
    args = parse_run("--type", "org.example.T", "--app-id", "a", "true")
    assert named_arguments(args) == {}
    assert command_of(args) == ["true"]
    assert args.instance_id is None


@pytest.mark.parametrize("flag", ["--see", "--talk", "--own"])
def test_level_flags_need_filter(flag: str) -> None:
    """--see/--talk/--own without --filter is a usage error naming both flags."""
    args = parse_run(
        "--type", "org.example.T", "--app-id", "a", flag, "org.example.X", "--", "true"
    )
    problem = check_usage(args)
    assert problem is not None and flag in problem and "--filter" in problem


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--call", "foo"], ["--call", "NAME=RULE", "'foo'"]),
        (["--broadcast", "org.example.X"], ["--broadcast", "NAME=RULE"]),
        (["--call", "org.example.X=nodots"], ["--call", "invalid rule"]),
        (["--call", "org.example.X=a.b@nopath"], ["--call", "invalid rule"]),
        (["--see", "not a name"], ["--see", "not a valid"]),
        (["--own", ":1.5"], ["--own", "unique name"]),
        (["--metadata", "novalue"], ["--metadata", "KEY=VALUE"]),
    ],
)
def test_bad_flag_values_are_usage_errors_naming_the_flag(
    argv: list[str], words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Malformed values are argparse errors (exit 2) naming the flag."""
    with pytest.raises(SystemExit) as exc:
        parse_run("--type", "org.example.T", "--app-id", "a", *argv, "--", "true")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
