"""The C front (app/dropin/front.c) and the Python drop-in agree on every command line.

The front handles only the common case itself (parse, bind, sync byte) and hands
anything else to the Python drop-in before binding; so for each command line both
forms must give the same exit status, messages and sync byte.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.support.dropin import dropin_programs

pytestmark = pytest.mark.timeout(120)

BAD = "unix:path=/nonexistent/bus"


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Both forms of the drop-in."""
    return dropin_programs(str(tmp_path_factory.mktemp("dropin")))


def _run(program: str, argv: list[str], args_data: bytes | None, tmp: str
         ) -> tuple[int, str, str, bool]:
    """(status, stdout, stderr, sync byte sent) of a command line expected to fail."""
    r, w = os.pipe()
    fds = [w]
    argv = [a.replace("SYNC", str(w)) for a in argv]
    if args_data is not None:
        ar, aw = os.pipe()
        os.write(aw, args_data)
        os.close(aw)
        fds.append(ar)
        argv = [a.replace("ARGS", str(ar)) for a in argv]
    env = dict(os.environ, XDG_RUNTIME_DIR=tmp)
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    done = subprocess.run([program, *argv], pass_fds=fds, env=env, capture_output=True,
                          text=True, timeout=30, check=False)
    for fd in fds:
        os.close(fd)
    synced = os.read(r, 1) == b"x"
    os.close(r)
    norm = (done.stdout + "\0" + done.stderr).replace(program, "PROG").split("\0")
    return done.returncode, norm[0], norm[1], synced


REFUSED = [
    ([], None),
    (["--help"], None),
    (["--version"], None),
    (["--fd=SYNC", "--bogus"], None),
    (["--fd=SYNC", "A"], None),
    (["--fd=SYNC", "A", "--filter"], None),
    (["--fd=x", "A", "P"], None),
    (["--fd=-1", "A", "P"], None),
    (["--fd=SYNC"], None),
    (["--fd=SYNC", "A", "P", "--see=:1.5"], None),
    (["--fd=SYNC", "A", "P", "--talk=org..x"], None),
    (["--fd=SYNC", "A", "P", "--own=*"], None),
    (["--fd=SYNC", "A", "P", "--own=org.*"], None),
    (["--fd=SYNC", "A", "P", "--call=org.x"], None),
    (["--fd=SYNC", "A", "P", "--call=org.x=@nopath"], None),
    (["--fd=SYNC", "A", "P", "--call=org.x=org.x.1M"], None),
    (["--fd=SYNC", "A", "P", "--broadcast=1bad=*"], None),
    (["--fd=SYNC", "A", "P", "--broadcast=org.a=@/a/"], None),
    (["--fd=SYNC", "A", "P", "--filter", "--bogus"], None),
    (["--fd=SYNC", "A", "P", "--version"], None),
    (["--fd=SYNC", "--args=ARGS"], b"A\0--see=:x\0"),
    (["--fd=SYNC", "A", "P", "--args=ARGS"], b"--talk=org.a\0B\0Q\0--bogus"),
    (["--fd=SYNC", "--args=99"], None),
    (["--fd=SYNC", "A", "TMP/no/such/dir/sock"], None),
    (["--fd=SYNC", "A", "TMP/" + "x" * 200], None),
    (["--fd=SYNC", "A", "TMP/ok", "B", "TMP/no/such/dir/sock"], None),
]


@pytest.mark.parametrize(("argv", "data"), REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_front_and_python_refuse_alike(
    programs: dict[str, str], tmp_path: object, argv: list[str], data: bytes | None
) -> None:
    """Same status, stdout and stderr; no sync byte unless the line was --help/--version;
    no socket left behind."""
    tmp = str(tmp_path)
    argv = [a.replace("TMP", tmp) for a in argv]
    results = [_run(programs[form], argv, data, tmp) for form in ("python", "front")]
    assert results[0] == results[1]
    status, _out, err, synced = results[0]
    assert not synced
    assert status in (0, 1), err
    assert not os.path.exists(os.path.join(tmp, "ok"))


ACCEPTED = [
    ["--fd=SYNC", BAD, "TMP/a", "--filter", "--talk=org.a.*", "--see=org.b",
     "--own=org.c.D", "--call=org.b=org.b.I.M@/x/*", "--call=org.b=*",
     "--broadcast=org.e=@/*", "--sloppy-names"],
    ["--fd=SYNC", "--args=ARGS"],
    [BAD, "TMP/a", "--fd=SYNC", "--filter", "--args=ARGS", "--call=org.f=@/"],
]
ARGS_DATA = b"\0".join([BAD.encode(), b"TMP/a", b"--filter", b"--own=org.x.App.*", BAD.encode(),
                        b"TMP/b", b"--talk=org.y"]) + b"\0"


@pytest.mark.parametrize("form", ["python", "front"])
@pytest.mark.parametrize("argv", ACCEPTED, ids=["options", "args-fd", "args-fd-in-group"])
def test_accepted_lines_sync_serve_and_clean_up(
    programs: dict[str, str], tmp_path: object, argv: list[str], form: str
) -> None:
    """Both forms: the byte comes once every socket listens; closing the pipe's reader
    ends the process with status 0 and its sockets gone."""
    tmp = str(tmp_path)
    r, w = os.pipe()
    ar, aw = os.pipe()
    os.write(aw, ARGS_DATA.replace(b"TMP", tmp.encode()))
    os.close(aw)
    argv = [a.replace("TMP", tmp).replace("SYNC", str(w)).replace("ARGS", str(ar))
            for a in argv]
    env = dict(os.environ, XDG_RUNTIME_DIR=tmp)
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    proc = subprocess.Popen([programs[form], *argv], pass_fds=[w, ar], env=env,
                            stderr=subprocess.PIPE, text=True)
    os.close(w)
    os.close(ar)
    assert os.read(r, 1) == b"x"
    sockets = [p for p in (os.path.join(tmp, "a"), os.path.join(tmp, "b")) if os.path.exists(p)]
    assert sockets
    for path in sockets:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)  # listening already, before any set-up after the byte
    os.close(r)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not any(os.path.exists(p) for p in sockets)
    assert err.count("serving in this process") == 1, err
