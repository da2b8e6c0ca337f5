"""Commands and probes run from outside the service: CLI clients (dbus-send, gdbus) as us or
as another uid (nobody), and raw connection and SASL probes of a socket.

A child running as another uid gets a stdlib-only interpreter and copies or pipes of what it
needs: it cannot read the checkout when that sits under a 0700 directory.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.support.names import MANAGER, MANAGER_PATH
from tests.support.sasl import opening

#: The uid a "local attacker" / "other user" runs as (nobody on Debian).
NOBODY = 65534


def connect_errno(path: str) -> int | None:
    """Try a plain connect(); None if it succeeded (the socket is closed again), else errno."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as exc:
        return exc.errno
    finally:
        s.close()
    return None


def sasl_probe(path: str, uid: int | None = None, timeout: float = 3.0) -> bytes:
    """Connect, send ``AUTH EXTERNAL <uid>``, return what came back until CRLF or close.

    ``b""`` means the server closed the connection without a word.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        try:
            s.sendall(opening(uid, begin=False))
        except (BrokenPipeError, ConnectionResetError):
            return b""
        data = b""
        while b"\r\n" not in data:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
        return data
    finally:
        s.close()


@contextmanager
def reachable_by_others(socket_path: str, top: str) -> Iterator[None]:
    """Let another uid reach ``socket_path``: dirs from ``top`` down get o+x, the socket o+rw.

    Restores the modes afterwards. The dirs stay unreadable (no listing).
    """
    saved: list[tuple[str, int]] = []
    d = os.path.dirname(socket_path)
    dirs = []
    top = os.path.abspath(top)
    while True:
        dirs.append(d)
        if os.path.abspath(d) == top or d == "/":
            break
        d = os.path.dirname(d)
    try:
        for p in dirs:
            mode = stat.S_IMODE(os.stat(p).st_mode)
            saved.append((p, mode))
            os.chmod(p, mode | 0o011)
        mode = stat.S_IMODE(os.stat(socket_path).st_mode)
        saved.append((socket_path, mode))
        os.chmod(socket_path, 0o777)
        yield
    finally:
        for p, mode in reversed(saved):
            try:
                os.chmod(p, mode)
            except FileNotFoundError:
                pass


#: A child that connects to argv[1] as whatever uid it runs as, sends the bytes hex-encoded
#: in argv[2] (else claims its own uid), and reports what the server said before closing.
_PROBE_CHILD = r"""
import binascii, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(3)
s.connect(sys.argv[1])
own = b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n"
data = b""
try:
    s.sendall(binascii.unhexlify(sys.argv[2]) if len(sys.argv) > 2 else own)
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
except (BrokenPipeError, ConnectionResetError):
    pass
except socket.timeout:
    print("TIMEOUT", repr(data))
    sys.exit(2)
print("CLOSED", os.getuid(), repr(data))
"""


def as_nobody_kwargs() -> dict[str, Any]:
    """Popen arguments that run a child as uid/gid 65534 with no supplementary groups."""
    return {
        "user": NOBODY,
        "group": NOBODY,
        "extra_groups": [],
        "cwd": "/",
        "env": {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/nonexistent",
            "LANG": "C.UTF-8",
        },
    }


def stdlib_python() -> str:
    """An interpreter another uid can execute (the venv's may point into /root)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK) and os.stat(candidate).st_mode & stat.S_IXOTH:
            return candidate
    return sys.executable


def probe_as_nobody(socket_path: str, send: bytes = b"") -> subprocess.CompletedProcess[str]:
    """Run the SASL probe child (stdlib only) as nobody; it sends ``send``, else an AUTH
    claiming its own uid."""
    return subprocess.run(
        [stdlib_python(), "-I", "-c", _PROBE_CHILD, socket_path, *([send.hex()] if send else [])],
        capture_output=True,
        text=True,
        timeout=10,
        **as_nobody_kwargs(),
    )


async def dbus_send(
    address: str,
    member: str,
    *args: str,
    dest: str = MANAGER,
    path: str = MANAGER_PATH,
    iface: str = MANAGER,
) -> str:
    """``dbus-send --print-reply`` (to the manager unless told); its output, failing the test
    on an error."""
    rc, out, err = await run_cmd(
        "dbus-send", f"--bus={address}", "--print-reply", f"--dest={dest}", path,
        f"{iface}.{member}", *args,
    )
    assert rc == 0, err
    return out


async def gdbus_call(
    address: str, path: str, method: str, *args: str, dest: str = MANAGER, nobody: bool = False
) -> tuple[int, str, str]:
    """``gdbus call`` of ``method`` (interface.member) on ``path`` (gdbus can spell a{sv});
    (exit status, stdout, stderr)."""
    argv = ["gdbus", "call", "--address", address, "-d", dest, "-o", path, "-m", method]
    return await run_cmd(*argv, *args, nobody=nobody)


async def run_cmd(*args: str, nobody: bool = False, timeout: float = 5.0) -> tuple[int, str, str]:
    """Run a command without blocking the loop (in-process peers keep serving)."""
    kwargs: dict[str, Any] = as_nobody_kwargs() if nobody else {}
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, **kwargs
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{args} did not finish within {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
