"""``serve --replace`` hands every server to a new process and loses no message (SPEC 13).

A sequence-checked stream of calls, each carrying an fd, runs through a filtered and an
unfiltered server while the service is replaced; one client is half-way through a
message at that moment. Every call arrives once, in order, with its fd; the old process
keeps forwarding its connections and exits 0 once they close; the new one answers
GetConnectionInfo and GetConnectionCredentials for them, takes new connections on the
same sockets, and announces ServerRemoved once per server.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from tests.conftest import add_server
from tests.support.bus import PrivateBus
from tests.support.commands import gdbus_call
from tests.support.names import FILTER
from tests.support.rawconn import RawConn, RawPeer
from tests.support.wire import Received, method_call, method_return

PEER = "org.example.Seq"
POLICY = "org.freedesktop.XdgContainers1.Policy"
MANAGER = "/org/freedesktop/DBus/Containers1"
IFACE = "org.freedesktop.DBus.Containers1"
CALLS = 200


class Recorder:
    """The peer's handler: Step(u seq, h fd) is recorded with the fd's bytes, answered."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[int, bytes]]] = {}
        self.lock = threading.Lock()

    def __call__(self, peer: RawPeer, call: Received) -> list[bytes] | None:
        msg = call.msg
        if msg.member != "Step" or not msg.sender:
            return None
        data = os.read(call.fds[0], 64) if call.fds else b""
        with self.lock:
            self.seen.setdefault(msg.sender, []).append((int(msg.body[0]), data))
        return [method_return(peer.reply_serial(), msg.serial, msg.sender, "u", [msg.body[0]])]


def _step(conn: RawConn, seq: int) -> bytes:
    """The bytes of Step(seq, fd) and the fd to send with them."""
    return method_call(conn.next_serial(), PEER, "/", PEER, "Step", "uh", [seq, 0], unix_fds=1)


def _pipe_with(text: bytes) -> int:
    r, w = os.pipe()
    os.write(w, text)
    os.close(w)
    return r


def _stream(conn: RawConn, errors: list[str], halfway: threading.Event) -> None:
    """CALLS calls one after the other, each checked; ``halfway`` set at CALLS // 4."""
    try:
        for seq in range(CALLS):
            if seq == CALLS // 4:
                halfway.set()
            fd = _pipe_with(str(seq).encode())
            data = _step(conn, seq)
            try:
                conn.send(data, [fd])
            finally:
                os.close(fd)
            reply = conn.read_reply(conn.serial, timeout=20)
            if reply.msg.message_type != MessageType.METHOD_RETURN or reply.msg.body != [seq]:
                errors.append(f"{conn.unique_name} call {seq}: {reply.msg.body}")
                return
            time.sleep(0.005)
    except Exception as exc:
        errors.append(f"{conn.unique_name}: {exc!r}")


async def _info(address: str, name: str) -> str:
    rc, out, err = await gdbus_call(address, MANAGER, f"{IFACE}.GetConnectionInfo", name)
    assert rc == 0, err
    return out


async def test_replace_hands_over_without_losing_a_message(
    service_factory: Any, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    old = service_factory()
    recorder = Recorder()
    peer = RawPeer(bus.address, PEER, recorder)
    removed: list[str] = []

    def watch(msg: Message) -> None:
        if msg.member == "ServerRemoved" and msg.interface == IFACE:
            removed.append(str(msg.body[0]))

    manager_bus.add_message_handler(watch)
    await manager_bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
        body=[f"type='signal',interface='{IFACE}',member='ServerRemoved'"]))
    plain, plain_res = await add_server(manager_bus, app_id="org.example.Plain")
    filtered, filt_res = await add_server(
        manager_bus, app_id="org.example.Filtered",
        named={FILTER: Variant("b", True), POLICY: Variant("a{ss}", {PEER: "talk"})})
    addresses = {plain: plain_res["Address"].value, filtered: filt_res["Address"].value}
    clients = {path: RawConn(address, timeout=20).setup(fds=True)
               for path, address in addresses.items()}
    # Half of a message before the hand-over, the rest after it.
    slow = RawConn(addresses[plain], timeout=20).setup(fds=True)
    slow_fd = _pipe_with(b"slow")
    slow_bytes = _step(slow, 7)
    slow.send(slow_bytes[:20], [slow_fd])
    os.close(slow_fd)

    errors: list[str] = []
    halfway = [threading.Event() for _ in clients]
    threads = [threading.Thread(target=_stream, args=(c, errors, h))
               for c, h in zip(clients.values(), halfway, strict=True)]
    for t in threads:
        t.start()
    for h in halfway:
        await asyncio.get_running_loop().run_in_executor(None, h.wait, 20)
    # Manager calls all through the hand-over: each answered, none lost to the switch
    # (the new process holds them until it has the servers).
    answers: list[str] = []
    replaced = threading.Event()

    async def ask() -> None:
        while not replaced.is_set():
            reply = await manager_bus.call(Message(
                destination="org.freedesktop.DBus.Containers1", path=MANAGER, interface=IFACE,
                member="GetServerInfo", signature="o", body=[filtered]))
            assert reply is not None
            answers.append(reply.error_name or "ok")
            await asyncio.sleep(0.002)

    asker = asyncio.ensure_future(ask())
    new = await asyncio.get_running_loop().run_in_executor(None, service_factory, "--replace")
    await asyncio.sleep(0.2)
    replaced.set()
    await asker
    assert "took over 2 server(s)" in new.log(), new.log()
    assert answers and set(answers) == {"ok"}, answers
    slow.send(slow_bytes[20:])
    reply = slow.read_reply(slow.serial, timeout=20)
    assert reply.msg.body == [7], reply.msg
    for t in threads:
        await asyncio.get_running_loop().run_in_executor(None, t.join, 60)
    assert errors == []
    for path, conn in clients.items():
        assert recorder.seen[conn.unique_name] == [(i, str(i).encode()) for i in range(CALLS)]
        # The new process answers for connections the old one still forwards.
        assert path in await _info(bus.address, conn.unique_name)
        rc, out, err = await gdbus_call(bus.address, MANAGER,
                                        f"{IFACE}.GetConnectionCredentials", conn.unique_name)
        assert rc == 0 and f"'ProcessID': <uint32 {os.getpid()}>" in out, err + out
    assert recorder.seen[slow.unique_name] == [(7, b"slow")]
    assert old.process.poll() is None, "the old process keeps forwarding"

    # New clients on the same sockets are the new process's, filtered as before; a
    # few in a row, so that an anchor answer read by the old process would show.
    for _ in range(5):
        RawConn(addresses[plain], timeout=20).setup(fds=True).close()
    late = RawConn(addresses[filtered], timeout=20).setup(fds=True)
    names = late.driver("ListNames").body[0]
    assert PEER in names and manager_bus.unique_name not in names
    assert filtered in await _info(bus.address, late.unique_name)

    for conn in (*clients.values(), slow):
        conn.close()
    deadline = time.monotonic() + 20
    while old.process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert old.process.poll() == 0, old.log()
    assert removed == []
    late.close()
    for path in (plain, filtered):
        rc, _, err = await gdbus_call(bus.address, MANAGER, f"{IFACE}.StopServer", path)
        assert rc == 0, err
    deadline = time.monotonic() + 5
    while len(removed) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert sorted(removed) == sorted([plain, filtered])
    peer.stop()


async def test_begin_is_refused_to_anyone_but_the_new_owner(
    service: Any, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    """A peer of the same user that does not own the name cannot take the servers."""
    await add_server(manager_bus, app_id="org.example.Kept")
    owner = await manager_bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="GetNameOwner", signature="s",
        body=["org.freedesktop.DBus.Containers1"]))
    assert owner is not None
    reply = await manager_bus.call(Message(
        destination=str(owner.body[0]), path=MANAGER,
        interface="org.freedesktop.XdgContainers1.Handover", member="Begin"))
    assert reply is not None and reply.error_name == "org.freedesktop.DBus.Error.AccessDenied"
    assert "new owner" in str(reply.body[0])
    rc, out, err = await gdbus_call(bus.address, MANAGER, f"{IFACE}.ListServers")
    assert rc == 0 and "/c0" in out, err


async def test_stop_server_after_the_hand_over_closes_the_old_processes_connections(
    service_factory: Any, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    """StopServer closes every connection, those the old process forwards too; the
    connections of another server stay."""
    old = service_factory()
    target, t_res = await add_server(manager_bus, app_id="org.example.Target")
    _bystander, b_res = await add_server(manager_bus, app_id="org.example.Bystander")
    victim = RawConn(t_res["Address"].value, timeout=10).setup()
    other = RawConn(b_res["Address"].value, timeout=10).setup()
    service_factory("--replace")
    rc, _, err = await gdbus_call(bus.address, MANAGER, f"{IFACE}.StopServer", target)
    assert rc == 0, err
    assert await asyncio.get_running_loop().run_in_executor(None, victim.wait_eof, 10.0)
    assert other.driver("GetId").body, "the other server's old connection is unharmed"
    other.close()
    victim.close()
    assert await asyncio.get_running_loop().run_in_executor(None, old.process.wait, 20) == 0


async def test_many_servers_go_over_in_batches_of_fds(
    service_factory: Any, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    """30 servers with a connection each (90 fds: more than one message may carry on a
    strict bus): all come over and all answer."""
    old = service_factory()
    servers = [await add_server(manager_bus, app_id=f"org.example.Many{i}") for i in range(30)]
    conns = [RawConn(res["Address"].value, timeout=10).setup() for _, res in servers]
    owner = await manager_bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="GetNameOwner", signature="s", body=[IFACE]))
    assert owner is not None
    old_name = str(owner.body[0])
    new = service_factory("--replace")
    assert "took over 30 server(s)" in new.log(), new.log()
    for conn in conns:
        assert conn.driver("GetId").body
    for path, res in servers:
        with RawConn(res["Address"].value, timeout=10).setup() as fresh:
            assert path in await _info(bus.address, fresh.unique_name)
    # Fds (the batches) is answered to the new process only.
    reply = await manager_bus.call(Message(
        destination=old_name, path=MANAGER, interface="org.freedesktop.XdgContainers1.Handover",
        member="Fds", signature="uu", body=[0, 1]))
    assert reply is not None and reply.error_name == "org.freedesktop.DBus.Error.AccessDenied"
    for conn in conns:
        conn.close()
    assert await asyncio.get_running_loop().run_in_executor(None, old.process.wait, 20) == 0


async def test_replace_detach_returns_once_the_new_service_serves(
    service_factory: Any, manager_bus: MessageBus, bus: PrivateBus, runtime_dir: str
) -> None:
    """``serve --replace --detach`` (the unit's ExecReload) exits 0 once the new process
    has the name and the servers; the new one keeps running, the old one exits."""
    import subprocess
    import sys

    from tests.conftest import REPO

    old = service_factory()
    path, res = await add_server(manager_bus, app_id="org.example.Reloaded")
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime_dir,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Output to a file: the detached service keeps it open (a pipe would never end).
    log = os.path.join(runtime_dir, "detached.log")
    with open(log, "wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "xdg_containers", "serve", "--address", bus.address,
             "--replace", "--detach"], env=env, cwd=REPO, stdout=out, stderr=out, timeout=60)
    with open(log) as fh:
        assert done.returncode == 0, fh.read()
    assert await asyncio.get_running_loop().run_in_executor(None, old.process.wait, 20) == 0
    owner = await manager_bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="GetConnectionUnixProcessID",
        signature="s", body=["org.freedesktop.DBus.Containers1"]))
    assert owner is not None and owner.message_type == MessageType.METHOD_RETURN
    new_pid = int(owner.body[0])
    try:
        with RawConn(res["Address"].value, timeout=10).setup() as conn:
            assert path in await _info(bus.address, conn.unique_name)
    finally:
        os.kill(new_pid, 15)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{new_pid}") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def test_handover_calls_from_a_confined_client_change_nothing(
    service: Any, manager_bus: MessageBus, bus: PrivateBus
) -> None:
    """The attacker, a client of one server, calls every Handover member on the service's
    unique name; a bystander on another server is unharmed and nothing is handed over,
    stopped or adopted."""
    attacker_server, a_res = await add_server(manager_bus, app_id="org.example.Attacker")
    bystander_server, b_res = await add_server(manager_bus, app_id="org.example.Bystander")
    bystander = RawConn(b_res["Address"].value, timeout=10).setup()
    owner = await manager_bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="GetNameOwner", signature="s",
        body=["org.freedesktop.DBus.Containers1"]))
    assert owner is not None
    service_name = str(owner.body[0])
    handover = "org.freedesktop.XdgContainers1.Handover"
    with RawConn(a_res["Address"].value, timeout=10).setup(fds=True) as attacker:
        begin = attacker.call(service_name, MANAGER, handover, "Begin").msg
        assert begin.error_name == "org.freedesktop.DBus.Error.AccessDenied", begin
        fds = attacker.call(service_name, MANAGER, handover, "Fds", "uu", [0, 16]).msg
        assert fds.error_name == "org.freedesktop.DBus.Error.AccessDenied", fds
        stop = attacker.call(service_name, MANAGER, handover, "Stop", "o",
                             [bystander_server]).msg
        assert stop.message_type == MessageType.ERROR, stop
        adopt = json.dumps({"path": attacker_server, "name": manager_bus.unique_name,
                            "pid": 1, "uid": 0, "gid": 0})
        attacker.send_call(service_name, MANAGER, handover, "Adopt", "s", [adopt])
        assert attacker.driver("GetId").body  # the attacker's own connection still works
    # Nothing changed: the bystander is served, both servers live, nobody adopted.
    assert bystander.driver("GetId").body
    rc, out, err = await gdbus_call(bus.address, MANAGER, f"{IFACE}.ListServers")
    assert rc == 0 and attacker_server in out and bystander_server in out, err
    rc, out, err = await gdbus_call(bus.address, MANAGER, f"{IFACE}.GetConnectionInfo",
                                    str(manager_bus.unique_name))
    assert rc != 0 and "NotContainer" in err, out
    bystander.close()


def test_a_private_bus_outlives_the_service_that_started_it_when_replaced(
    runtime_dir: str,
) -> None:
    """``serve --private`` started the bus; ``serve --replace`` on that bus takes over:
    the first process keeps the bus (the new service is on it) until it is stopped."""
    import select
    import subprocess
    import sys

    from tests.conftest import REPO

    env = dict(os.environ, XDG_RUNTIME_DIR=runtime_dir,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    first = subprocess.Popen([sys.executable, "-m", "xdg_containers", "serve", "--private"],
                             env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    try:
        assert first.stdout is not None
        ready, _, _ = select.select([first.stdout], [], [], 30)
        assert ready
        line = first.stdout.readline().decode()
        assert line.startswith("DBUS_SESSION_BUS_ADDRESS="), line
        address = line.split("=", 1)[1].strip()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the first service owns its name
            r = subprocess.run(["gdbus", "call", "--address", address, "-d",
                                "org.freedesktop.DBus.Containers1", "-o", MANAGER, "-m",
                                f"{IFACE}.ListServers"], capture_output=True, timeout=30)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        done = subprocess.run([sys.executable, "-m", "xdg_containers", "serve", "--address",
                               address, "--replace", "--detach"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=60)
        assert done.returncode == 0
        time.sleep(0.5)
        assert first.poll() is None, "the bus must stay while the new service uses it"
        r = subprocess.run(["gdbus", "call", "--address", address, "-d",
                            "org.freedesktop.DBus.Containers1", "-o", MANAGER, "-m",
                            f"{IFACE}.AddServer", "org.example.T", "org.example.App", "i",
                            "{}", "{'StopOnDisconnect': <false>}"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        first.terminate()
        assert first.wait(20) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        if first.stdout is not None:
            first.stdout.close()
