"""The shell AddServer examples of docs/interface.md, run as written against a private bus:
each makes a server that still listens after the command returned (StopOnDisconnect false);
without that, the first one's server would stop at once (why the doc says to pass it)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from tests.conftest import REPO, ServiceProcess, call, connect, ok
from tests.integration.test_cli_common import server_property, wait_until

pytestmark = pytest.mark.timeout(90)

DOC = Path(REPO) / "docs" / "interface.md"
SERVER_PATH = re.compile(r"/org/freedesktop/DBus/Containers1/c[0-9]+")
KEEP = "'StopOnDisconnect': <false>"


def sh_blocks() -> list[str]:
    """The doc's ```sh blocks, in order."""
    return re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S)


def commands(block: str) -> list[str]:
    """A block's commands (they are separated by blank lines), comment lines dropped; one
    may span lines (continuations, quoted text), as bash reads it."""
    out = []
    for paragraph in block.split("\n\n"):
        lines = [line for line in paragraph.splitlines() if not line.lstrip().startswith("#")]
        if "".join(lines).strip():
            out.append("\n".join(lines).strip())
    return out


def shorthand() -> str:
    """The block defining $C1, $M and $B that the examples use."""
    return next(b for b in sh_blocks() if b.startswith("C1="))


def add_server_examples() -> list[str]:
    """Every gdbus/busctl AddServer command of the first block that has one."""
    block = next(b for b in sh_blocks() if "AddServer" in b)
    found = [c for c in commands(block) if "AddServer" in c and c.split()[0] in ("gdbus", "busctl")]
    assert len(found) >= 2, found
    return found


async def run_example(command: str) -> str:
    """Run one example in bash after the shorthand; its stdout."""
    done = await asyncio.to_thread(
        subprocess.run, ["bash", "-c", shorthand() + command], capture_output=True,
        text=True, timeout=60, check=False, env=dict(os.environ),
    )
    assert done.returncode == 0, (command, done.stderr)
    return done.stdout


async def test_first_add_server_example_mentions_stop_on_disconnect() -> None:
    """The first example is the one people copy: it keeps its server."""
    first = add_server_examples()[0]
    assert first.startswith("gdbus call --session $C1 --method $M.AddServer "), first
    assert KEEP in first


async def test_add_server_examples_keep_listening(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    """Each example, run as written, leaves a server that listens and serves clients after
    the command (and so its bus connection) is gone."""
    for command in add_server_examples():
        out = await run_example(command)
        match = SERVER_PATH.search(out)
        assert match, out
        path = match.group(0)
        await asyncio.sleep(0.5)  # past StopOnDisconnect's reaction to the caller leaving
        assert await server_property(manager_bus, path, "Listening") is True, command
        address = await server_property(manager_bus, path, "Address")
        client = await connect(address)
        try:
            info = ok(await call(manager_bus, "GetConnectionInfo", "s", [client.unique_name]))
            assert info[0] == path
        finally:
            client.disconnect()


async def test_without_stop_on_disconnect_false_the_server_stops_at_once(
    service: ServiceProcess, manager_bus: MessageBus
) -> None:
    """Why the doc passes it: the first example with the default gives a server that has
    stopped listening by the time anyone could use it."""
    command = add_server_examples()[0].replace(KEEP, "")
    out = await run_example(command)
    match = SERVER_PATH.search(out)
    assert match, out
    path = match.group(0)

    async def gone() -> bool:
        servers = ok(await call(manager_bus, "ListServers"))[0]
        return path not in servers

    await wait_until(gone, f"{path} to be removed once gdbus left", timeout=10)
