"""Listening sockets kept outside the service survive its SIGKILL (SPEC 13, docs/fdstore.md).

A stand-in service (tests/support/fdstore_program.py) keeps three listening sockets,
is killed with SIGKILL, and its next run gets the same sockets back: same inode, and a
client that connected during the outage is served. Under a real ``systemd --user``
(fenced: tests/support/usermanager.py), under a supervisor speaking systemd's protocol
that records every message (tests/support/fdsupervisor.py), and with the fd keeper,
whose activation on demand goes through a real dbus-daemon; the keeper refuses other
uids and shrugs off garbage.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.support.bus import started_bus
from tests.support.processes import alive, rss_kib, wait_for
from tests.support.usermanager import UserManager, usable
from xdg_containers.service.fdkeeperlink import KEEPER
from xdg_containers.service.fdstore import open_fd_store

pytestmark = pytest.mark.timeout(60)

NAMES = {"c1.listen", "c2.listen", "c3.listen"}
#: Generous: two shared cores, other suites running.
SLOW = 15.0


class Rig:
    """The stand-in service's directory, its runs and the processes started."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = directory / "program.log"

    def env(self, **extra: str) -> dict[str, str]:
        """Our environment with the checkout importable."""
        return dict(os.environ, PYTHONPATH=REPO, **extra)

    def command(self, scope: str, bus: str | None = None) -> list[str]:
        """The stand-in service's command line."""
        tail = [bus] if bus else []
        return [sys.executable, "-m", "tests.support.fdstore_program", str(self.dir), scope,
                *tail]

    def popen(self, argv: list[str], **extra: str) -> subprocess.Popen[bytes]:
        """A process logging to program.log (a keeper it starts inherits that)."""
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(argv, cwd=REPO, env=self.env(**extra),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.procs.append(proc)
        return proc

    def state(self, run: int) -> dict[str, Any]:
        """What run ``run`` wrote once it was done."""
        path = self.dir / f"run-{run}.json"
        wait_for(path.exists, f"run {run}; log:\n{self.log_text()}", SLOW)
        result: dict[str, Any] = json.loads(path.read_text())
        return result

    def log_text(self) -> str:
        """Everything the programs (and keepers) logged."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill9(self, pid: int) -> None:
        """SIGKILL and wait until it is gone."""
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), f"pid {pid} to die", SLOW)

    def client(self, name: str) -> socket.socket:
        """A client connected to listening socket ``name`` (queued: nobody accepts yet)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(SLOW)
        sock.connect(str(self.dir / (name.split(".")[0] + ".sock")))
        return sock


@pytest.fixture
def rig(tmp_path: Path, runtime_dir: str) -> Iterator[Rig]:
    """A rig; afterwards every process it started and every keeper of this runtime dir
    is killed."""
    r = Rig(tmp_path)
    yield r
    for proc in r.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=SLOW)
    for pid in keepers(runtime_dir):
        os.kill(pid, signal.SIGKILL)


def keepers(runtime_dir: str, scope: str = "") -> list[int]:
    """Keeper processes whose socket is under ``runtime_dir`` (of ``scope``, if given)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(KEEPER) in argv and any(
            a.startswith(os.fsencode(runtime_dir)) and a.endswith(os.fsencode(scope))
            for a in argv
        ) and alive(int(entry)):
            found.append(int(entry))
    return found


def the_keeper(runtime_dir: str, scope: str) -> int:
    """The one keeper of ``scope``."""
    wait_for(lambda: len(keepers(runtime_dir, scope)) == 1, f"one keeper of {scope}", SLOW)
    return keepers(runtime_dir, scope)[0]


def events(path: Path) -> list[dict[str, Any]]:
    """The supervisor's events so far."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_event(path: Path, count: int, **match: Any) -> dict[str, Any]:
    """The ``count``-th event with these fields."""
    def found() -> list[dict[str, Any]]:
        return [e for e in events(path) if all(e.get(k) == v for k, v in match.items())]
    wait_for(lambda: len(found()) >= count, f"event {match} x{count} in {events(path)}", SLOW)
    return found()[count - 1]


def test_systemd_store_brings_the_sockets_back_after_sigkill(rig: Rig) -> None:
    """Against systemd's protocol: three sockets stored, the service SIGKILLed, the restart
    gets the same sockets (same inodes, close-on-exec, LISTEN_* unset) and serves the
    client that queued during the outage; a removed name does not come back; a clean stop
    removes every name."""
    log = rig.dir / "events"
    supervisor = rig.popen([
        sys.executable, "-m", "tests.support.fdsupervisor", "--events", str(log),
        "--notify", f"@xdgc-test-notify-{secrets.token_hex(8)}", "--restart-sec", "1.5",
        "--", *rig.command("scope1"),
    ])
    first = rig.state(1)
    assert first["backend"] == "SystemdFdStore"
    assert set(first["created"]) == NAMES and first["inherited"] == {}
    for name, ino in first["created"].items():
        assert wait_event(log, 1, event="stored", name=name)["ino"] == ino
    (rig.dir / "remove").write_text("c2.listen\n")

    rig.kill9(first["pid"])
    wait_event(log, 1, event="exited", signal=signal.SIGKILL)
    client = rig.client("c1.listen")
    queued_at = time.monotonic()
    second = rig.state(2)
    assert wait_event(log, 2, event="started")["t"] > queued_at, "the client did not queue"
    assert second["t0"] > queued_at
    assert second["inherited"] == first["created"]
    assert second["cloexec"] and second["listen_env"] == []
    assert second["served"] == {"c1.listen": 1, "c2.listen": 0, "c3.listen": 0}
    assert client.recv(100) == b"served by run 2"
    wait_event(log, 2, event="removed", name="c2.listen")

    rig.kill9(second["pid"])
    third = rig.state(3)
    assert third["inherited"] == {k: v for k, v in first["created"].items() if k != "c2.listen"}
    os.kill(third["pid"], signal.SIGTERM)
    assert supervisor.wait(timeout=SLOW) == 0
    ends = [(e["event"], e.get("name")) for e in events(log)][-4:]
    assert ends[:2] == [("removed", "c1.listen"), ("removed", "c3.listen")], ends
    assert ends[-2:] == [("exited", None), ("stopped", None)], ends


UNIT = Path(REPO) / "data" / "systemd" / "user" / "xdg-containers.service.in"
TEST_UNIT = """[Unit]
DefaultDependencies=no
[Service]
Type=simple
Environment=PYTHONPATH={repo}
WorkingDirectory={repo}
ExecStart={command}
RestartSec=1
StandardOutput=append:{log}
StandardError=append:{log}
{shipped}
"""


def test_real_systemd_brings_the_sockets_back_after_sigkill(rig: Rig, runtime_dir: str,
                                                            tmp_path: Path) -> None:
    """The same under a real ``systemd --user`` (fenced in a cgroup of its own) with the
    shipped unit's Restart=, FileDescriptorStoreMax= and NotifyAccess=: the restart after
    SIGKILL gets the same sockets and serves the client queued meanwhile; a removed name
    does not come back; a clean stop is not restarted."""
    why = usable()
    assert why is None, f"a fenced systemd --user cannot run here: {why}"
    shipped = [line for line in UNIT.read_text().splitlines()
               if line.startswith(("Restart=", "FileDescriptorStoreMax=", "NotifyAccess="))]
    assert len(shipped) == 3, shipped
    units = tmp_path / "units"
    units.mkdir()
    (units / "xdgc-fdtest.service").write_text(TEST_UNIT.format(
        repo=REPO, command=" ".join(rig.command("scope9")), log=rig.log,
        shipped="\n".join(shipped)))
    manager = UserManager(str(units), runtime_dir, "xdgc-fdtest.service", str(rig.log))
    try:
        first = rig.state(1)
        manager.check_fence()
        assert first["backend"] == "SystemdFdStore" and set(first["created"]) == NAMES
        (rig.dir / "remove").write_text("c2.listen\n")
        rig.kill9(first["pid"])
        client = rig.client("c1.listen")
        queued_at = time.monotonic()
        second = rig.state(2)
        assert second["t0"] > queued_at, "the client did not queue during the outage"
        assert second["inherited"] == first["created"]
        assert second["cloexec"] and second["listen_env"] == []
        assert second["served"] == {"c1.listen": 1, "c2.listen": 0, "c3.listen": 0}
        assert client.recv(100) == b"served by run 2"
        rig.kill9(second["pid"])
        third = rig.state(3)
        assert third["inherited"] == {
            k: v for k, v in first["created"].items() if k != "c2.listen"}
        os.kill(third["pid"], signal.SIGTERM)
        wait_for(lambda: not alive(third["pid"]), "the clean stop", SLOW)
        time.sleep(2.5)  # RestartSec=1: a restart would have happened by now
        assert not (rig.dir / "run-4.json").exists(), "a clean stop was restarted"
        manager.check_fence()
    finally:
        manager.stop()


def test_keeper_brings_the_sockets_back_after_sigkill(rig: Rig, runtime_dir: str) -> None:
    """Without systemd: the keeper, started detached on the first store, outlives the
    SIGKILLed service; the next run takes the same sockets and serves the client that
    queued meanwhile; a removed name does not come back; a clean stop ends the keeper."""
    rig.popen(rig.command("scope2"))
    first = rig.state(1)
    assert first["backend"] == "KeeperFdStore" and set(first["created"]) == NAMES
    keeper = the_keeper(runtime_dir, "scope2")
    with open(f"/proc/{keeper}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    assert int(fields[1]) != first["pid"], "the keeper is the service's child"
    assert int(fields[3]) == keeper, "the keeper is not in a session of its own"
    (rig.dir / "remove").write_text("c2.listen\n")

    rig.kill9(first["pid"])
    assert alive(keeper)
    client = rig.client("c1.listen")
    rig.popen(rig.command("scope2"))
    second = rig.state(2)
    assert second["inherited"] == first["created"] and second["cloexec"]
    assert second["served"] == {"c1.listen": 1, "c2.listen": 0, "c3.listen": 0}
    assert client.recv(100) == b"served by run 2"

    rig.kill9(second["pid"])
    last = rig.popen(rig.command("scope2"))
    third = rig.state(3)
    assert third["inherited"] == {k: v for k, v in first["created"].items() if k != "c2.listen"}
    rss = rss_kib(keeper)
    print(f"fd keeper RSS: {rss} KiB")
    assert rss < 16 * 1024, f"the keeper grew to {rss} KiB"
    assert keepers(runtime_dir) == [keeper]
    last.terminate()
    assert last.wait(timeout=SLOW) == 0
    wait_for(lambda: not alive(keeper), "the keeper to exit after a clean stop", SLOW)
    assert not os.path.exists(os.path.join(runtime_dir, "xdg-containers", "fdstore-scope2"))


ACTIVATED = """#!/bin/sh
echo "$$" > {marker}
exec {command} 2>>{log}
"""


def test_keeper_starts_the_service_when_a_client_waits(rig: Rig, runtime_dir: str) -> None:
    """Socket activation without systemd: with the service dead, a client connecting to a
    kept socket makes the keeper ask the bus (StartServiceByName); the bus runs the
    service's .service file, and the started service serves the waiting client."""
    services = rig.dir / "services"
    services.mkdir()
    script = rig.dir / "activated.sh"
    marker = rig.dir / "activated"
    bus = started_bus(service_dirs=[str(services)])
    try:
        command = " ".join(shlex.quote(a) for a in rig.command("scope3", bus.address))
        script.write_text(ACTIVATED.format(marker=shlex.quote(str(marker)), command=command,
                                           log=shlex.quote(str(rig.log))))
        script.chmod(0o755)
        (services / "org.freedesktop.DBus.Containers1.service").write_text(
            "[D-BUS Service]\nName=org.freedesktop.DBus.Containers1\n"
            f"Exec=/usr/bin/env PYTHONPATH={REPO} {script}\n"
        )
        rig.popen(rig.command("scope3", bus.address))
        first = rig.state(1)
        keeper = the_keeper(runtime_dir, "scope3")
        rig.kill9(first["pid"])
        time.sleep(0.2)
        assert not marker.exists()
        client = rig.client("c3.listen")
        assert client.recv(100) == b"served by run 2", rig.log_text()
        second = rig.state(2)
        assert marker.read_text().strip() == str(second["pid"])
        assert second["served"] == {"c1.listen": 0, "c2.listen": 0, "c3.listen": 1}
        assert "asked the bus to start the service" in rig.log_text()
        os.kill(second["pid"], signal.SIGTERM)
        wait_for(lambda: not alive(keeper), "the keeper to exit after a clean stop", SLOW)
    finally:
        bus.stop()


NOBODY_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.send(b"HELLO=1")
    print(repr(s.recv(100)))
except OSError as exc:
    print(type(exc).__name__)
"""


def test_keeper_refuses_a_peer_of_another_uid(rig: Rig, runtime_dir: str) -> None:
    """Even with the directory's protection opened up, uid 65534 gets no answer (the
    keeper checks SO_PEERCRED), it is logged once, and the keeper keeps its fds."""
    proc = rig.popen(rig.command("scope4"))
    rig.state(1)
    keeper = the_keeper(runtime_dir, "scope4")
    path = os.path.join(runtime_dir, "xdg-containers", "fdstore-scope4")
    for d in (runtime_dir, os.path.dirname(path)):
        os.chmod(d, 0o711)
    os.chmod(path, 0o666)
    for _ in range(2):
        out = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", NOBODY_CLIENT, path],
                             user=65534, group=65534, capture_output=True, text=True,
                             timeout=SLOW, check=True)
        assert out.stdout.strip() in ("b''", "ConnectionResetError", "BrokenPipeError"), out
    assert rig.log_text().count("refused a client of uid 65534") == 1, rig.log_text()
    assert alive(keeper)
    assert set(held(runtime_dir, "scope4")) == NAMES
    proc.terminate()
    wait_for(lambda: not alive(keeper), "the keeper to exit", SLOW)


GARBAGE: list[tuple[bytes, int]] = [
    (b"\xff\xfe\x00binary", 0),
    (b"FDSTORE=1\nFDNAME=bad name", 1),
    (b"FDSTORE=1\nFDNAME=c1.listen", 0),
    (b"FDSTORE=1\nFDNAME=c1.listen", 3),
    (b"FDSTOREREMOVE=1\nFDNAME=a:b", 0),
    (b"HELLO=1\nHELLO=1", 0),
    (b"WHATEVER=1", 2),
    (b"X" * 10000, 0),
]


def test_keeper_shrugs_off_garbage(rig: Rig, runtime_dir: str) -> None:
    """A hostile peer of our own uid sending garbage (twice over) is logged once; the
    keeper carries on holding its fds, and a bystander scope's keeper is untouched."""
    target = rig.popen(rig.command("scope5"))
    rig.state(1)
    bystander_dir = rig.dir / "bystander"
    bystander_dir.mkdir()
    other = Rig(bystander_dir)
    other.procs = rig.procs
    other.log = rig.log
    bystander = other.popen(other.command("scope6"))
    other.state(1)
    keeper = the_keeper(runtime_dir, "scope5")
    bystander_keeper = the_keeper(runtime_dir, "scope6")
    spare = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    try:
        for _ in range(2):
            hostile = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            hostile.connect(os.path.join(runtime_dir, "xdg-containers", "fdstore-scope5"))
            for data, nfds in GARBAGE:
                socket.send_fds(hostile, [data], spare[:nfds])
            hostile.send(b"HELLO=1")
            assert hostile.recv(100).startswith(b"READY=1"), "the keeper stopped answering"
            hostile.close()
    finally:
        for fd in spare:
            os.close(fd)
    assert rig.log_text().count("ignored a bad packet") == 1, rig.log_text()
    assert alive(keeper) and alive(bystander_keeper)
    assert set(held(runtime_dir, "scope5")) == NAMES
    assert set(held(runtime_dir, "scope6")) == NAMES
    for proc in (target, bystander):
        proc.terminate()
        assert proc.wait(timeout=SLOW) == 0
    wait_for(lambda: not keepers(runtime_dir), "both keepers to exit", SLOW)


def test_keeper_replaces_a_name_and_drops_an_fd_whose_peer_hung_up(runtime_dir: str) -> None:
    """As systemd: a second store of a name replaces the first, and a kept socket whose
    peer hung up (an anchor's Connector after the anchor died) is dropped (POLLHUP)."""
    store = open_fd_store("scope7")
    assert store is not None
    first, second = (socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2))
    ours, anchors = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        for sock in (first, second):
            sock.bind(os.path.join(runtime_dir, f"{sock.fileno()}.sock"))
            sock.listen()
        store.store("c1.listen", first.fileno())
        store.store("c1.listen", second.fileno())
        store.store("c1.connector", ours.fileno())
        keeper = the_keeper(runtime_dir, "scope7")
        ours.close()
        anchors.close()
        wait_for(lambda: held(runtime_dir, "scope7") == {
            "c1.listen": os.fstat(second.fileno()).st_ino}, "c1.connector dropped", SLOW)
    finally:
        for sock in (first, second, ours, anchors):
            sock.close()
        store.close()
    wait_for(lambda: not alive(keeper), "the keeper to exit after a clean stop", SLOW)


def held(runtime_dir: str, scope: str) -> dict[str, int]:
    """What the keeper of ``scope`` holds: name -> inode (it keeps its copies)."""
    store = open_fd_store(scope)
    assert store is not None
    got = store.take_inherited()
    inodes = {name: os.fstat(fd).st_ino for name, fd in got.items()}
    for fd in got.values():
        os.close(fd)
    conn = getattr(store, "conn", None)
    if conn is not None:
        conn.close()
    return inodes


def test_keeper_keeps_the_fds_when_a_replaced_service_stops(runtime_dir: str) -> None:
    """``serve --replace``: the old service's clean stop while its successor is connected
    ends only the old one's connection; the successor's clean stop ends the keeper."""
    old, new = open_fd_store("scope8"), open_fd_store("scope8")
    assert old is not None and new is not None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(os.path.join(runtime_dir, "replaced.sock"))
        listener.listen()
        old.store("c1.listen", listener.fileno())
        for fd in new.take_inherited().values():
            os.close(fd)
        keeper = the_keeper(runtime_dir, "scope8")
        old.close()
        assert set(held(runtime_dir, "scope8")) == {"c1.listen"}
        assert alive(keeper)
        new.close()
        wait_for(lambda: not alive(keeper), "the keeper to exit after a clean stop", SLOW)
    finally:
        listener.close()
