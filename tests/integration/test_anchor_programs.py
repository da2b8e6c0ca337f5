"""Both anchor programs (the C ``xdg-containers-anchor`` and ``program.py``) behave alike.

Each test runs once per implementation and drives it directly over socketpairs,
as the service (``zygote.py``, ``link.py``) and a launcher (``launch.py``) do:
``serve FD`` on a Connector, ``zygote FD KIND`` inside the bubblewrap sandbox
``sandbox.zygote_argv`` builds. Connections go to real unix listeners, and who
made them is read from ``SO_PEERCRED`` and ``/proc/PID/root`` as the bus and a
portal would. The C program is built from source when no fresh build exists, so
the ``c`` cases never skip.
"""

from __future__ import annotations

import array
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import NOBODY, as_nobody_kwargs, stdlib_python
from tests.support.processes import alive
from xdg_containers.anchor.binary import BINARY, PROGRAM
from xdg_containers.anchor.link import request_address
from xdg_containers.anchor.program import received_fds
from xdg_containers.anchor.sandbox import anchor_argv, zygote_argv

pytestmark = pytest.mark.timeout(90)

SOURCE = Path(PROGRAM).with_name("anchor.c")
#: Compiled with anchor.c (the Connector answer, shared with the drop-in's front).
SOURCES = [SOURCE, SOURCE.with_name("answer.c")]
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE", "-Wl,-z,now"]
IDENTITY = {"flatpak": ".flatpak-info", "xdg": ".xdg-containers-info"}
OTHER = {"flatpak": "xdg", "xdg": "flatpak"}
MAX_ERROR = 1024
TIMEOUT = 20.0


def compile_anchor(out: Path) -> Path:
    """Build anchor.c with the project's strict flags (warnings are errors)."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.fail("no C compiler (cc) to build the C anchor: install build-essential")
    proc = subprocess.run([cc, *CFLAGS, "-o", str(out), *map(str, SOURCES)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return out


@pytest.fixture(scope="module")
def c_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tools/bootstrap's build when it is at least as new as anchor.c, else a fresh one."""
    built = Path(sys.prefix) / "libexec" / BINARY
    newest = max(p.stat().st_mtime for p in [*SOURCES, SOURCE.with_name("answer.h")])
    if os.access(built, os.X_OK) and built.stat().st_mtime >= newest:
        return built
    return compile_anchor(tmp_path_factory.mktemp("anchor") / BINARY)


@pytest.fixture(params=["c", "python"])
def impl(request: pytest.FixtureRequest) -> str:
    """Which implementation a test runs."""
    return str(request.param)


@pytest.fixture
def command(impl: str, c_binary: Path) -> list[str]:
    """The command prefix for the implementation under test, as root."""
    if impl == "c":
        return [str(c_binary)]
    return [sys.executable, "-I", "-S", PROGRAM]


@pytest.fixture
def nobody_command(impl: str, c_binary: Path) -> Iterator[list[str]]:
    """The same program copied where uid 65534 can run it (tmp dirs are root's, 0700)."""
    d = tempfile.mkdtemp(prefix="xdgc-anchor-nobody-")
    os.chmod(d, 0o755)
    try:
        if impl == "c":
            dst = os.path.join(d, BINARY)
            shutil.copyfile(c_binary, dst)
            os.chmod(dst, 0o755)
            yield [dst]
        else:
            dst = os.path.join(d, "program.py")
            shutil.copyfile(PROGRAM, dst)
            os.chmod(dst, 0o644)
            yield [stdlib_python(), "-I", "-S", dst]
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- helpers ---------------------------------------------------------------------------------


def peercred(sock: socket.socket) -> tuple[int, int, int]:
    """SO_PEERCRED: (pid, uid, gid) of whoever connect()ed."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def recv_packet(sock: socket.socket, timeout: float = TIMEOUT) -> tuple[bytes, list[int]]:
    """One answer packet and every fd it carried (all CLOEXEC; the caller closes them)."""
    sock.settimeout(timeout)
    data, anc, flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC)
    assert not flags & socket.MSG_CTRUNC
    return data, received_fds(anc)


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """One packet with ``fds`` attached (SCM_RIGHTS), or none."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


class Listener:
    """An abstract (or path) unix listener standing in for the bus."""

    def __init__(self, path: str | None = None) -> None:
        """Listen on a fresh abstract name, or on ``path``."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if path is None:
            self.name = f"xdgc-test-anchorprog-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + self.name)
            self.address = request_address(b"\0" + self.name.encode())
        else:
            self.sock.bind(path)
            self.address = request_address(path)
        self.sock.listen(16)
        self.sock.settimeout(TIMEOUT)

    def accept_pid(self) -> tuple[int, int]:
        """Accept one connection: (pid, uid) of who connected."""
        conn, _ = self.sock.accept()
        with conn:
            pid, uid, _gid = peercred(conn)
        return pid, uid

    def close(self) -> None:
        """Stop listening."""
        self.sock.close()


def ask(conn: socket.socket, address: str | bytes) -> tuple[bytes, list[int]]:
    """Send one request; the answer."""
    conn.send(address.encode() if isinstance(address, str) else address)
    return recv_packet(conn)


def check_connected(data: bytes, fds: list[int]) -> None:
    """Byte 0 and exactly one connected AF_UNIX SOCK_STREAM socket; the fd is closed."""
    try:
        assert data == b"\x00" and len(fds) == 1, (data, fds)
        with socket.socket(fileno=os.dup(fds[0])) as got:
            assert got.family == socket.AF_UNIX
            assert got.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
            got.getpeername()  # connected
    finally:
        for fd in fds:
            os.close(fd)


def check_error(data: bytes, fds: list[int], *words: str) -> str:
    """Byte 1, no fd, a UTF-8 message of at most 1024 bytes containing ``words``."""
    for fd in fds:
        os.close(fd)
    assert fds == [], "an error answer carried fds"
    assert data[:1] == b"\x01", data[:80]
    assert 0 < len(data) - 1 <= MAX_ERROR
    text = data[1:].decode("utf-8")  # strict: it must be valid UTF-8
    for word in words:
        assert word in text, text
    return text




def exists(pid: int) -> bool:
    """True while ``pid`` has a /proc entry (zombies included)."""
    return os.path.exists(f"/proc/{pid}")


def wait_until(cond: Any, timeout: float = TIMEOUT) -> bool:
    """Poll ``cond()`` until true or ``timeout``; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


def wait_or_kill(proc: subprocess.Popen[bytes]) -> int:
    """The exit status of a program whose input just ended (killed if it outlives
    TIMEOUT); its stderr pipe is closed."""
    try:
        return proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


class Serve:
    """``serve FD`` as a child process; ``conn`` is the service's end."""

    def __init__(self, command: list[str], **popen: Any) -> None:
        """Start it with the other end of a fresh SOCK_SEQPACKET pair."""
        self.conn, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([*command, "serve", str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE,
                                     **popen)
        theirs.close()

    def close(self) -> int:
        """EOF on the Connector; the exit status."""
        self.conn.close()
        return wait_or_kill(self.proc)


class Zygote:
    """``zygote FD KIND`` in the bubblewrap sandbox the service uses."""

    def __init__(self, command: list[str], kind: str, caps: bool = True, **popen: Any) -> None:
        """Start it and wait for ``ready``; ``caps=False`` without CAP_SYS_ADMIN."""
        self.kind = kind
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        placeholder = os.open(os.devnull, os.O_RDONLY)
        bwrap = shutil.which("bwrap")
        assert bwrap is not None, "bubblewrap is needed (tools/bootstrap installs it)"
        argv = zygote_argv(bwrap, kind, theirs.fileno(), placeholder)
        # The sandbox as the service builds it, running the implementation under test.
        argv = [*argv[: argv.index("--") + 1], *command, "zygote", str(theirs.fileno()), kind]
        if not caps:
            at = argv.index("--cap-add")
            argv[at : at + 2] = ["--cap-drop", "ALL"]
        try:
            self.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(), placeholder),
                                         stderr=subprocess.PIPE, **popen)
        finally:
            theirs.close()
            os.close(placeholder)
        data, fds = recv_packet(self.ctl)
        assert (data, fds) == (b"ready", []), self.stderr_text()
        self.anchors: list[socket.socket] = []

    def stderr_text(self) -> str:
        """What the sandbox wrote so far, once it exited."""
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode("utf-8", "replace")

    def fork(self, identity: bytes) -> tuple[int, socket.socket]:
        """One anchor with ``identity``: (its pid, our end of its Connector)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        send_with_fds(self.ctl, identity, [theirs.fileno()])
        theirs.close()
        data, fds = recv_packet(self.ctl)
        assert fds == [] and data[:1] == b"\x00", data
        self.anchors.append(ours)
        return int(data[1:]), ours

    def close(self) -> int:
        """EOF on the control socket and on every anchor; the zygote's exit status."""
        for a in self.anchors:
            a.close()
        self.ctl.close()
        return wait_or_kill(self.proc)


# -- serve ------------------------------------------------------------------------------------


def test_c_anchor_compiles_without_warnings(tmp_path: Path) -> None:
    """anchor.c builds with -Wall -Wextra -Werror, C11, nothing but libc."""
    out = compile_anchor(tmp_path / BINARY)
    assert os.access(out, os.X_OK)


def test_serve_hands_back_its_own_connection(command: list[str], tmp_path: Path) -> None:
    """A connection to an abstract and to an escaped path listener comes back, made by the
    anchor (its pid in SO_PEERCRED); the first unix entry that answers is the one used."""
    anchor = Serve(command)
    abstract = Listener()
    weird = tmp_path / "a bus;with,odd=chars%"
    path = Listener(str(weird))
    try:
        for address in (abstract.address, path.address,
                        f"tcp:host=localhost,port=1;{abstract.address};unix:path=/nonexistent"):
            data, fds = ask(anchor.conn, address)
            check_connected(data, fds)
            listener = path if address == path.address else abstract
            assert listener.accept_pid() == (anchor.proc.pid, os.getuid())
    finally:
        abstract.close()
        path.close()
    assert anchor.close() == 0


def test_serve_reads_addresses_as_program_py(command: list[str]) -> None:
    """Within the first unix entry the last path= wins and path= beats abstract=; other
    keys, empty items and %xx escapes (either case) are fine."""
    anchor = Serve(command)
    good = Listener()
    name = good.name
    upper = "".join(f"%{b:02X}" for b in name.encode())
    try:
        for address in (f"unix:path=/nonexistent,abstract={name}",
                        f"unix:abstract={name},path=/nonexistent"):
            check_error(*ask(anchor.conn, address), "cannot connect")
        for address in (f"unix:abstract=/nonexistent,abstract={name}",
                        f"unix:guid=0123,,abstract={upper},",
                        f"unix:tmpdir=/tmp;unix:abstract={name}"):
            check_connected(*ask(anchor.conn, address))
            assert good.accept_pid()[0] == anchor.proc.pid
    finally:
        good.close()
    assert anchor.close() == 0


def test_serve_errors_are_byte_one_and_text(command: list[str]) -> None:
    """No such socket, a malformed address, tcp: only, bad UTF-8, a too long path, a huge
    request: byte 1 and at most 1024 bytes of UTF-8, no fd; the anchor keeps serving."""
    anchor = Serve(command)
    good = Listener()
    try:
        cases: list[tuple[str | bytes, tuple[str, ...]]] = [
            (f"unix:abstract=xdgc-test-nobody-listens-{os.getpid()}", ("cannot connect",)),
            ("unix:path=/nonexistent/bus", ("cannot connect",)),
            ("unix:path=%zzsocket", ("cannot connect",)),
            ("tcp:host=127.0.0.1,port=4", ("no unix:path= or unix:abstract= entry",)),
            ("unix:tmpdir=/tmp", ("no unix:path= or unix:abstract= entry",)),
            (b"unix:path=/tmp/\xff\xfe", ("cannot connect",)),
            ("unix:path=/" + "x" * 200, ("cannot connect",)),
            ("unix:abstract=" + "y" * 200, ("cannot connect",)),
            ("tcp:host=" + "\u00e9" * 30000, ("no unix:path= or unix:abstract= entry",)),
            # every entry is tried; the reasons of all come back
            (f"unix:path=/nonexistent;unix:abstract=xdgc-none-{os.getpid()}",
             ("cannot connect", ";")),
        ]
        for address, words in cases:
            data, fds = ask(anchor.conn, address)
            check_error(data, fds, *words)
        data, fds = ask(anchor.conn, good.address)
        check_connected(data, fds)
        assert good.accept_pid()[0] == anchor.proc.pid
        # entries are tried in order, as a client does: a dead first one is skipped
        data, fds = ask(anchor.conn, f"unix:path=/nonexistent;{good.address}")
        check_connected(data, fds)
        assert good.accept_pid()[0] == anchor.proc.pid
    finally:
        good.close()
    assert anchor.close() == 0


def test_serve_ignores_sigint_and_ends_on_eof(command: list[str]) -> None:
    """The terminal's Ctrl-C is not for the anchor; EOF on the Connector is: exit 0."""
    anchor = Serve(command)
    listener = Listener()
    try:
        time.sleep(0.3)  # the Python anchor installs SIG_IGN after its interpreter starts
        anchor.proc.send_signal(signal.SIGINT)
        data, fds = ask(anchor.conn, listener.address)
        check_connected(data, fds)
        assert anchor.proc.poll() is None
    finally:
        listener.close()
    assert anchor.close() == 0


def test_serve_as_an_ordinary_user(nobody_command: list[str]) -> None:
    """As uid 65534 the connection carries the anchor's pid and uid 65534."""
    anchor = Serve(nobody_command, **as_nobody_kwargs())
    listener = Listener()
    try:
        data, fds = ask(anchor.conn, listener.address)
        check_connected(data, fds)
        assert listener.accept_pid() == (anchor.proc.pid, NOBODY)
        data, fds = ask(anchor.conn, "unix:path=/nonexistent")
        check_error(data, fds, "cannot connect")
    finally:
        listener.close()
    assert anchor.close() == 0


def test_launcher_anchor_in_bubblewrap(command: list[str]) -> None:
    """``anchor_argv`` (the launcher's anchor): the process that connects shows the identity
    file in its root; EOF ends it and bwrap with it."""
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    identity = b"[Application]\nname=org.example.Launched\n"
    memfd = os.memfd_create("identity", 0)
    os.write(memfd, identity)
    os.lseek(memfd, 0, os.SEEK_SET)
    conn, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    argv = anchor_argv(bwrap, "org.flatpak", theirs.fileno(), memfd)
    argv = [*argv[: argv.index("--") + 1], *command, "serve", str(theirs.fileno())]
    proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(), memfd))
    theirs.close()
    os.close(memfd)
    listener = Listener()
    try:
        data, fds = ask(conn, listener.address)
        check_connected(data, fds)
        pid, _uid = listener.accept_pid()
        with open(f"/proc/{pid}/root/.flatpak-info", "rb") as fh:
            assert fh.read() == identity
        assert not os.path.exists(f"/proc/{pid}/root/.xdg-containers-info")
    finally:
        listener.close()
        conn.close()
        try:
            assert proc.wait(TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- zygote -----------------------------------------------------------------------------------


def _identity(kind: str, app: str) -> bytes:
    if kind == "flatpak":
        return f"[Application]\nname={app}\n\n[Instance]\ninstance-id=i-{app}\n".encode()
    return f"[Container]\ntype=io.example.Box\napp-id={app}\ninstance-id=i\n".encode()


@pytest.mark.parametrize("kind", ["flatpak", "xdg"])
def test_zygote_child_carries_the_identity(command: list[str], kind: str) -> None:
    """Each forked anchor shows its own identity file (and not the other kind's) at
    /proc/PID/root, in a mount namespace of its own with the staging dir empty, and its
    connections carry its pid."""
    zygote = Zygote(command, kind)
    listener = Listener()
    try:
        made = []
        for app in ("org.example.One", "org.example.Two"):
            pid, conn = zygote.fork(_identity(kind, app))
            made.append((pid, app))
            data, fds = ask(conn, listener.address)
            check_connected(data, fds)
            assert listener.accept_pid() == (pid, os.getuid())
        for pid, app in made:
            root = f"/proc/{pid}/root"
            with open(f"{root}/{IDENTITY[kind]}", "rb") as fh:
                assert fh.read() == _identity(kind, app)
            assert not os.path.exists(f"{root}/{IDENTITY[OTHER[kind]]}")
            assert os.listdir(f"{root}/.xdg-containers-anchor") == []
            assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
            with pytest.raises(OSError):  # read-only: the app cannot rewrite who it is
                open(f"{root}/{IDENTITY[kind]}", "ab").close()
    finally:
        listener.close()
    assert zygote.close() == 0


def test_zygote_refuses_requests_without_exactly_one_fd(command: list[str]) -> None:
    """No fd, or two: byte 1 and a message, the extra fds closed (their peers see EOF),
    and the zygote keeps serving."""
    zygote = Zygote(command, "flatpak")
    listener = Listener()
    try:
        send_with_fds(zygote.ctl, b"[Application]\nname=a\n", [])
        check_error(*recv_packet(zygote.ctl), "exactly one")
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
        send_with_fds(zygote.ctl, b"[Application]\nname=b\n", [a.fileno() for a, _ in pairs])
        for a, _ in pairs:
            a.close()
        check_error(*recv_packet(zygote.ctl), "exactly one")
        for _, b in pairs:
            b.settimeout(TIMEOUT)
            assert b.recv(16) == b"", "the zygote kept a refused fd open"
            b.close()
        pid, conn = zygote.fork(_identity("flatpak", "org.example.After"))
        check_connected(*ask(conn, listener.address))
        assert listener.accept_pid()[0] == pid
    finally:
        listener.close()
    assert zygote.close() == 0


def test_zygote_child_reports_a_failed_set_up(command: list[str]) -> None:
    """Without CAP_SYS_ADMIN a child cannot enter its mount namespace: it says so on its
    Connector (byte 1) and exits, and the zygote is reaped-clean and keeps serving."""
    zygote = Zygote(command, "flatpak", caps=False)
    try:
        for _ in range(2):
            pid, conn = zygote.fork(_identity("flatpak", "org.example.NoCaps"))
            check_error(*recv_packet(conn), "anchor set-up failed", "unshare")
            conn.settimeout(TIMEOUT)
            assert conn.recv(16) == b"", "the failed anchor did not exit"
            assert wait_until(lambda p=pid: not exists(p))
    finally:
        assert zygote.close() == 0


def test_zygote_reaps_its_anchors_and_ends_on_eof(command: list[str]) -> None:
    """An anchor exits when its Connector closes and the zygote reaps it (no zombie);
    EOF on the control socket ends the zygote with status 0."""
    zygote = Zygote(command, "xdg")
    pids = []
    for i in range(3):
        pid, conn = zygote.fork(_identity("xdg", f"org.example.R{i}"))
        pids.append((pid, conn))
    for pid, conn in pids:
        assert alive(pid)
        conn.close()
    zygote.anchors.clear()
    for pid, _ in pids:
        assert wait_until(lambda p=pid: not exists(p)), f"anchor {pid} left a zombie or lives"
    assert zygote.proc.poll() is None
    assert zygote.close() == 0


def test_zygote_as_an_ordinary_user(nobody_command: list[str]) -> None:
    """As uid 65534 (bwrap in a user namespace: locked mount flags, no umount): the child
    binds its identity, which the same uid reads through /proc/PID/root, and connects as
    itself; refusals, reaping and EOF work the same."""
    zygote = Zygote(nobody_command, "flatpak", **as_nobody_kwargs())
    listener = Listener()
    try:
        identity = _identity("flatpak", "org.example.User")
        pid, conn = zygote.fork(identity)
        check_connected(*ask(conn, listener.address))
        assert listener.accept_pid() == (pid, NOBODY)
        for path, want in ((f"/proc/{pid}/root/.flatpak-info", identity.decode()),
                           (f"/proc/{pid}/root/.xdg-containers-anchor", "")):
            reader = ["/bin/cat", path] if want else ["/bin/ls", "-A", path]
            seen = subprocess.run(reader, capture_output=True, text=True, timeout=TIMEOUT,
                                  **as_nobody_kwargs())
            assert seen.returncode == 0 and seen.stdout == want, seen
        assert not os.path.exists(f"/proc/{pid}/root/.xdg-containers-info")
        send_with_fds(zygote.ctl, b"x", [])
        check_error(*recv_packet(zygote.ctl), "exactly one")
        conn.close()
        zygote.anchors.clear()
        assert wait_until(lambda: not exists(pid)), "the anchor was not reaped"
    finally:
        listener.close()
    assert zygote.close() == 0

