"""Real clients through a minted socket (gdbus, busctl, dbus-send, dbus-python, dbus-fast,
a hand-written pipelining client), fd passing both ways, and the manager's introspection
and CLI callability (SPEC §2, §5)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.constants import RequestNameReply

from tests.conftest import IFACE, NAME, PATH, ServiceProcess, add_server, call, connect, ok
from tests.integration.helpers_c1 import (
    DRIVER,
    Observer,
    driver_call,
    list_servers,
    name_has_owner,
    recv_until,
    socket_path_of,
)
from tests.support.bus import PrivateBus
from tests.support.clients import run_busctl, run_dbus_python, run_dbus_send, run_gdbus
from tests.support.commands import dbus_send, gdbus_call, run_cmd
from tests.support.sasl import opening
from tests.support.wire import decode, wire_length
from tests.support.wire import driver_call as raw_driver_call

pytestmark = pytest.mark.timeout(30)


PEER = "org.example.C1Peer"
PEER_PATH = "/org/example/C1Peer"
PEER_IFACE = "org.example.C1Peer"
ECHO_TOOL = "org.example.EchoTool"
APP_ID = "org.example.ClientApp"


class Peer:
    """A service on the real bus: ``Echo(s) -> s`` answers ``"<caller's app id>|<arg>"``
    (asking our service who the caller is); ``Swap(h) -> h`` reads the pipe it got and
    returns a new pipe holding ``b"from-peer:" + what it read``."""

    def __init__(self, bus: MessageBus) -> None:
        """Serve on ``bus``."""
        self.bus = bus
        self.kept_fds: list[int] = []
        self.received: list[bytes] = []
        self.tasks: set[asyncio.Task[None]] = set()
        bus.add_message_handler(self._handle)

    def _handle(self, msg: Message) -> Message | bool | None:
        if msg.message_type != MessageType.METHOD_CALL or msg.interface != PEER_IFACE:
            return None
        if msg.member == "Echo" and msg.signature == "s":
            task = asyncio.get_running_loop().create_task(self._echo(msg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return True
        if msg.member == "Swap" and msg.signature == "h":
            fds = list(msg.unix_fds)
            try:
                got = b""
                fd = fds[msg.body[0]]
                while chunk := os.read(fd, 4096):
                    got += chunk
            finally:
                for f in fds:
                    os.close(f)
            self.received.append(got)
            r, w = os.pipe()
            os.write(w, b"from-peer:" + got)
            os.close(w)
            self.kept_fds.append(r)  # closed at teardown: sending is asynchronous
            return Message.new_method_return(msg, "h", [0], [r])
        return None

    async def _echo(self, msg: Message) -> None:
        info = await call(self.bus, "GetConnectionInfo", "s", [msg.sender])
        who = info.body[3] if info.message_type == MessageType.METHOD_RETURN else "unconfined"
        self.bus.send(Message.new_method_return(msg, "s", [f"{who}|{msg.body[0]}"]))

    def close(self) -> None:
        """Release what the peer holds."""
        for fd in self.kept_fds:
            os.close(fd)
        for t in self.tasks:
            t.cancel()
        self.bus.disconnect()


@pytest.fixture
async def peer(bus: PrivateBus) -> AsyncIterator[Peer]:
    conn = await connect(bus.address)
    assert await conn.request_name(PEER) == RequestNameReply.PRIMARY_OWNER
    p = Peer(conn)
    yield p
    p.close()


@pytest.fixture
async def echo_tool(bus: PrivateBus, observer: Observer) -> AsyncIterator[str]:
    """``dbus-test-tool echo`` on the real bus; yields its unique name."""
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus.address)
    proc = subprocess.Popen(
        ["dbus-test-tool", "echo", f"--name={ECHO_TOOL}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def owned() -> bool:
            return any(
                e.kind == "owner" and e.args[0] == ECHO_TOOL and e.args[2] for e in observer.events
            )

        if not await name_has_owner(observer.bus, ECHO_TOOL):
            await observer.wait_for(owned, f"{ECHO_TOOL} on the bus")
        yield ok(await driver_call(observer.bus, "GetNameOwner", "s", [ECHO_TOOL]))[0]
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
async def minted(
    service: ServiceProcess, manager_bus: MessageBus
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A server for APP_ID: (path, results)."""
    path, results = await add_server(manager_bus, "org.example.Test", APP_ID, "i1")
    yield path, results


#: A minted server: (path, results).
Minted = tuple[str, dict[str, Any]]

#: The command-line and library clients, each run by tests/support/clients.py.
CLIENTS = {"gdbus": run_gdbus, "busctl": run_busctl, "dbus-send": run_dbus_send,
           "dbus-python": run_dbus_python}


# -- CLI and library clients call a peer through the minted socket ---------------------------


@pytest.mark.parametrize("client", ["gdbus", "busctl", "dbus-send", "dbus-python"])
async def test_client_calls_peer(client: str, minted: Minted, peer: Peer) -> None:
    address = minted[1]["Address"].value
    outcome = await asyncio.to_thread(
        CLIENTS[client], address, PEER, PEER_PATH, PEER_IFACE, "Echo", "s", ["hello"]
    )
    assert outcome == ("ok", f"{APP_ID}|hello")


@pytest.mark.parametrize("client", ["gdbus", "busctl", "dbus-send", "dbus-python"])
async def test_client_calls_echo_tool(client: str, minted: Minted, echo_tool: str) -> None:
    address = minted[1]["Address"].value
    outcome = await asyncio.to_thread(
        CLIENTS[client], address, ECHO_TOOL, "/", "org.example.Anything", "Method"
    )
    assert outcome in (("ok", None), ("ok", ())), outcome
    if client == "dbus-send":  # the reply comes from the echo tool itself
        out = await dbus_send(
            address, "Method", dest=ECHO_TOOL, path="/", iface="org.example.Anything"
        )
        assert re.search(rf"method return .*sender={re.escape(echo_tool)}\b", out), out


# -- unix fds both ways -----------------------------------------------------------------------


async def test_fd_passes_both_ways(minted: tuple[str, dict[str, Any]], peer: Peer) -> None:
    confined = await connect(minted[1]["Address"].value)
    r, w = os.pipe()
    got_fd: int | None = None
    try:
        os.write(w, b"from-client")
        os.close(w)
        w = -1
        reply = await call(
            confined,
            "Swap",
            "h",
            [0],
            destination=PEER,
            path=PEER_PATH,
            interface=PEER_IFACE,
            unix_fds=[r],
        )
        assert ok(reply) == [0] and reply.signature == "h"
        assert peer.received == [b"from-client"], "the peer could not read the client's pipe"
        assert len(reply.unix_fds) == 1
        got_fd = reply.unix_fds[0]
        data = b""
        while chunk := os.read(got_fd, 4096):
            data += chunk
        assert data == b"from-peer:from-client"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        if got_fd is not None:
            os.close(got_fd)
        confined.disconnect()


# -- a client that pipelines the whole handshake and Hello in one write ---------------------


def _pipelined_session(
    socket_path: str, with_call: bool, bytewise: bool = False
) -> tuple[socket.socket, bytes, list[Any]]:
    """Connect and send AUTH+NEGOTIATE_UNIX_FD+BEGIN+Hello (+GetId) in one write.

    Returns the still-open socket, the SASL lines received and the parsed messages.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(socket_path)
        payload = opening(fds=True) + raw_driver_call(1, "Hello")
        if with_call:
            payload += raw_driver_call(2, "GetId")
        if bytewise:
            for i in range(len(payload)):
                s.sendall(payload[i : i + 1])
        else:
            s.sendall(payload)  # one write
        buf = recv_until(s, b"", lambda b: b.count(b"\r\n") >= 2)
        lines_end = buf.index(b"\r\n", buf.index(b"\r\n") + 2) + 2
        lines, rest = buf[:lines_end], buf[lines_end:]
        wanted = {1, 2} if with_call else {1}
        messages: list[Any] = []

        def have_all(b: bytes) -> bool:
            messages.clear()
            while len(b) >= 16 and len(b) >= (n := wire_length(b)):
                messages.append(decode(b[:n]))
                b = b[n:]
            return wanted <= {m.reply_serial for m in messages}

        recv_until(s, rest, have_all)
        return s, lines, list(messages)
    except BaseException:
        s.close()
        raise


@pytest.mark.parametrize(
    "with_call, bytewise",
    [(False, False), (True, False), (True, True)],
    ids=["hello", "hello+call", "hello+call-one-byte-per-write"],
)
async def test_pipelined_handshake_and_hello(
    minted: tuple[str, dict[str, Any]], manager_bus: MessageBus, with_call: bool, bytewise: bool
) -> None:
    path, results = minted
    sock, lines, messages = await asyncio.to_thread(
        _pipelined_session, socket_path_of(results), with_call, bytewise
    )
    try:
        guid = re.search(r"guid=([0-9a-f]{32})", results["Address"].value).group(1)  # type: ignore[union-attr]
        assert lines == b"OK " + guid.encode() + b"\r\nAGREE_UNIX_FD\r\n"
        hello = next(m for m in messages if m.reply_serial == 1)
        assert hello.message_type == MessageType.METHOD_RETURN
        assert hello.signature == "s"
        assert hello.sender == DRIVER
        unique = hello.body[0]
        assert unique.startswith(":")
        assert hello.destination == unique  # the client's own name
        if with_call:
            getid = next(m for m in messages if m.reply_serial == 2)
            assert getid.message_type == MessageType.METHOD_RETURN
            bus_id = ok(await driver_call(manager_bus, "GetId"))[0]
            assert getid.body[0] == bus_id
        # The unique name in the Hello reply is the client's own, and ours.
        info = ok(await call(manager_bus, "GetConnectionInfo", "s", [unique]))
        assert info[0] == path
    finally:
        sock.close()


# -- introspection and CLI callability of the manager ------------------------------------------


EXPECTED_METHODS = {
    "AddServer": (["s", "s", "s", "a{sv}", "a{sv}"], ["o", "a{sv}"]),
    "StopServer": (["o"], []),
    "StopListening": (["o"], []),
    "GetConnectionInfo": (["s"], ["o", "a{sv}", "s", "s", "s", "a{sv}"]),
    "GetServerInfo": (["o"], ["a{sv}", "s", "s", "s", "a{sv}"]),
    "GetConnectionCredentials": (["s"], ["a{sv}"]),
    "ListServers": ([], ["ao"]),
}


async def test_gdbus_introspect_manager(service: ServiceProcess, bus: PrivateBus) -> None:
    rc, out, err = await run_cmd(
        "gdbus",
        "introspect",
        "--address",
        bus.address,
        "--dest",
        NAME,
        "--object-path",
        PATH,
        "--xml",
    )
    assert rc == 0, err
    root = ET.fromstring(out)
    ifaces = {i.get("name"): i for i in root.findall("interface")}
    assert IFACE in ifaces, list(ifaces)
    iface = ifaces[IFACE]
    methods = {m.get("name"): m for m in iface.findall("method")}
    for name, (ins, outs) in EXPECTED_METHODS.items():
        assert name in methods, f"{name} missing from Introspect"
        args = methods[name].findall("arg")
        assert [a.get("type") for a in args if a.get("direction", "in") == "in"] == ins, name
        assert [a.get("type") for a in args if a.get("direction") == "out"] == outs, name
    signals = {s.get("name"): s for s in iface.findall("signal")}
    assert [a.get("type") for a in signals["ServerRemoved"].findall("arg")] == ["o"]
    props = {p.get("name"): p for p in iface.findall("property")}
    assert props["SupportedArguments"].get("type") == "as"
    assert props["SupportedArguments"].get("access") == "read"


async def test_manager_callable_from_cli(
    service: ServiceProcess, bus: PrivateBus, manager_bus: MessageBus
) -> None:
    path, _results = await add_server(manager_bus, "org.example.Test", "app", "inst")
    # busctl and gdbus can pass a{sv} arguments (each CLI caller is its own creator
    # and leaves at once, so its server stops listening right away).
    rc, out, err = await run_cmd(
        "busctl",
        f"--address={bus.address}",
        "call",
        NAME,
        PATH,
        IFACE,
        "AddServer",
        "sssa{sv}a{sv}",
        "org.example.Cli",
        "busctl-app",
        "",
        "1",
        "k",
        "s",
        "v",
        "0",
    )
    assert rc == 0, err
    assert re.match(r'oa\{sv\} "/org/freedesktop/DBus/Containers1/c\d+" 2 ', out), out
    assert '"Address" s "unix:path=' in out and '"SocketPath" ay ' in out, out
    rc, out, err = await gdbus_call(
        bus.address, PATH, f"{IFACE}.AddServer", "org.example.Cli", "gdbus-app", "", "{}", "{}"
    )
    assert rc == 0, err
    assert re.match(
        r"\(objectpath '/org/freedesktop/DBus/Containers1/c\d+', \{'Address': <'unix:path=", out
    ), out
    # dbus-send where no a{sv} argument is needed.
    out = await dbus_send(bus.address, "GetServerInfo", f"objpath:{path}")
    assert (
        'string "org.example.Test"' in out and 'string "app"' in out and 'string "inst"' in out
    ), out
    out = await dbus_send(bus.address, "ListServers")
    assert f'object path "{path}"' in out, out
    rc, out, err = await run_cmd(
        "busctl",
        f"--address={bus.address}",
        "get-property",
        NAME,
        PATH,
        IFACE,
        "SupportedArguments",
    )
    assert rc == 0, err
    assert out.startswith("as 10 ") and '"StopOnNotify"' in out, out
    await dbus_send(bus.address, "StopServer", f"objpath:{path}")
    assert path not in await list_servers(manager_bus)
