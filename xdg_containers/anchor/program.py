"""The anchor process: connects to the bus on the service's behalf (SPEC section 10).

A bus records the pid of the process that ``connect()``s. The anchor lives in
the app instance's context (a mount namespace whose root carries the
instance's identity file), connects when the service asks and hands the
connected socket back, so the bus, ``SO_PEERPIDFD`` and every pid-based
consumer (xdg-desktop-portal reading ``/proc/PID/root/.flatpak-info``) name
the anchor, never the service.

Protocol on the Connector socket (``AF_UNIX``, ``SOCK_SEQPACKET``): the service
sends one packet, a bus address (``unix:path=...`` or ``unix:abstract=...``,
UTF-8; with several entries, the first that answers is used, as a D-Bus
client does); the anchor answers with one packet, byte 0 plus one connected stream
socket (``SCM_RIGHTS``), or byte 1 plus a UTF-8 error message. EOF ends it.

This file is self-contained and imports only the standard library: it runs as
``python3 -I -S program.py serve FD`` (one anchor) or ``... zygote FD KIND``
(a small process that forks anchors, so each costs a few pages instead of an
interpreter). No asyncio: an anchor blocks on its one socket.
"""

from __future__ import annotations

import array
import gc
import os
import signal
import socket
import sys

#: Identity file names by kind (the kind is the zygote's second argument).
IDENTITY_FILES = {"flatpak": "/.flatpak-info", "xdg": "/.xdg-containers-info"}
#: A tmpfs in the zygote's sandbox where a new anchor writes its identity file
#: before binding it over the placeholder.
STAGING_DIR = "/.xdg-containers-anchor"
MAX_ERROR = 1024

_CLONE_NEWNS = 0x00020000
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2



def received_fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of every SCM_RIGHTS message in ``recvmsg``'s ancillary data."""
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds

def unescape(value: str) -> str:
    """Undo D-Bus address escaping (``%2f`` -> ``/``)."""
    if "%" not in value:
        return value
    out = bytearray()
    i = 0
    raw = value.encode("utf-8", "surrogateescape")
    while i < len(raw):
        if raw[i] == 0x25 and i + 3 <= len(raw):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def sockaddrs_of(address: str) -> list[str | bytes]:
    """The unix socket addresses of a D-Bus address's entries, in order."""
    out: list[str | bytes] = []
    for entry in address.split(";"):
        transport, _, rest = entry.partition(":")
        if transport != "unix":
            continue
        params = dict(kv.partition("=")[::2] for kv in rest.split(",") if kv)
        if "path" in params:
            out.append(unescape(params["path"]))
        elif "abstract" in params:
            out.append(b"\0" + os.fsencode(unescape(params["abstract"])))
    if not out:
        raise ValueError(f"no unix:path= or unix:abstract= entry in {address[:200]!r}")
    return out


def connect_first(address: str) -> socket.socket:
    """A stream socket connected to the first entry of ``address`` that answers, as a
    D-Bus client tries them."""
    problems = []
    for target in sockaddrs_of(address):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            conn.connect(target)
            return conn
        except OSError as exc:
            conn.close()
            problems.append(f"{target!r}: {exc.strerror or exc}")
    raise OSError("; ".join(problems))


def answer(sock: socket.socket, request: bytes) -> None:
    """Connect to the requested bus and send the socket back, or say why not."""
    try:
        conn = connect_first(request.decode("utf-8"))
    except (OSError, ValueError) as exc:
        text = f"cannot connect to the bus: {exc}".encode("utf-8", "replace")[:MAX_ERROR]
        sock.send(b"\x01" + text)
        return
    try:
        fds = array.array("i", [conn.fileno()])
        sock.sendmsg([b"\x00"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
    finally:
        conn.close()


def serve(sock: socket.socket) -> int:
    """Answer requests until the service closes its end; 0 on EOF."""
    while True:
        try:
            request = sock.recv(65536)
        except OSError:
            return 1
        if not request:
            return 0
        try:
            answer(sock, request)
        except OSError:
            return 1


def _libc() -> object:
    import ctypes  # only the zygote's children mount anything

    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter_identity(libc: object, kind: str, identity: bytes) -> None:
    """In a fresh mount namespace, bind ``identity`` over this kind's placeholder."""
    target = IDENTITY_FILES[kind].encode()
    _check(libc.unshare(_CLONE_NEWNS), "unshare")  # type: ignore[attr-defined]
    _check(
        libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None),  # type: ignore[attr-defined]
        "make / private",
    )
    staged = f"{STAGING_DIR}/{os.getpid()}"
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    try:
        os.write(fd, identity)
    finally:
        os.close(fd)
    _check(libc.mount(staged.encode(), target, None, _MS_BIND, None), "bind identity")  # type: ignore[attr-defined]
    # In a user namespace the staging tmpfs's nosuid/nodev are locked: a remount
    # must keep them (else EPERM); as root either form works.
    ro = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    _check(libc.mount(None, target, None, ro, None), "make identity read-only")  # type: ignore[attr-defined]
    os.unlink(staged)
    # Other anchors' files pass through the staging dir: not visible from ours. In a
    # user namespace bwrap's mounts are locked (no umount): cover it with an empty one.
    if libc.umount2(STAGING_DIR.encode(), _MNT_DETACH) != 0:  # type: ignore[attr-defined]
        flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV
        _check(
            libc.mount(b"tmpfs", STAGING_DIR.encode(), b"tmpfs", flags, b"size=4k"),  # type: ignore[attr-defined]
            "hide staging dir",
        )


def _reap(_signum: int, _frame: object) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def zygote(ctl: socket.socket, kind: str) -> int:
    """Fork one anchor per request: packet = identity file bytes + the anchor's socket.

    Answers byte 0 + the new anchor's pid, or byte 1 + an error. The children
    share this process's pages, so an anchor costs what it writes, not an
    interpreter.
    """
    libc = _libc()
    signal.signal(signal.SIGCHLD, _reap)
    # A collection in a child would walk (and so copy) every page of the heap it
    # shares with us: no collections, and what exists now is never looked at again.
    gc.disable()
    gc.freeze()
    ctl.send(b"ready")
    while True:
        try:
            data, anc, _flags, _addr = ctl.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
        except OSError:
            return 1
        if not data:
            return 0
        fds = received_fds(anc)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            ctl.send(b"\x01expected exactly one socket with the request")
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(fds[0])
            ctl.send(b"\x01" + f"fork failed: {exc}".encode()[:MAX_ERROR])
            continue
        if pid == 0:
            _anchor_child(ctl, fds[0], libc, kind, data)
        os.close(fds[0])
        ctl.send(b"\x00" + str(pid).encode())


def _anchor_child(ctl: socket.socket, fd: int, libc: object, kind: str, identity: bytes) -> None:
    status = 1
    try:
        ctl.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock = socket.socket(fileno=fd)
        try:
            enter_identity(libc, kind, identity)
        except OSError as exc:
            sock.send(b"\x01" + f"anchor set-up failed: {exc}".encode()[:MAX_ERROR])
            sock.close()
            os._exit(1)
        status = serve(sock)
    finally:
        os._exit(status)


def main(argv: list[str]) -> int:
    """``serve FD`` or ``zygote FD KIND``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher's Ctrl-C is not for us
    if len(argv) >= 2 and argv[0] == "serve":
        return serve(socket.socket(fileno=int(argv[1])))
    if len(argv) >= 3 and argv[0] == "zygote" and argv[2] in IDENTITY_FILES:
        return zygote(socket.socket(fileno=int(argv[1])), argv[2])
    sys.stderr.write("usage: program.py serve FD | zygote FD flatpak|xdg\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
