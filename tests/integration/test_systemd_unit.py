"""The systemd user unit: its address-family restriction is what docs/interface.md says
("The systemd user unit and tcp: buses"), the documented drop-in is valid, and under the
same seccomp restriction the service serves unix buses and refuses a tcp: Bus clearly."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import Variant

from tests.conftest import REPO, add_server, call, connect, error, ok, start_service
from tests.support.bus import PrivateBus
from tests.support.packages import ensure_packages

pytestmark = pytest.mark.timeout(120)

UNIT = Path(REPO) / "data" / "systemd" / "user" / "xdg-containers.service.in"
DOC = Path(REPO) / "docs" / "interface.md"
BUS_ARG = "org.freedesktop.XdgContainers1.Bus"
#: What systemd's RestrictAddressFamilies=AF_UNIX installs: a seccomp filter making
#: socket() of any other family fail with EAFNOSUPPORT (inherited across exec).
RESTRICT = textwrap.dedent(
    """
    import errno, os, socket, sys
    import seccomp
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket",
               seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
    f.load()
    os.execv(sys.argv[1], sys.argv[1:])
    """
)


def documented_drop_in() -> str:
    """The ini block of the section on the unit and tcp: buses."""
    text = DOC.read_text()
    section = text[text.index("### The systemd user unit and `tcp:` buses") :]
    match = re.search(r"```ini\n(.*?)```", section, re.S)
    assert match, "no drop-in example in the section"
    return match.group(1)


def unit_lines() -> list[str]:
    """The unit's settings (no comments)."""
    return [line for line in UNIT.read_text().splitlines() if line and line[0] not in "#;"]


def test_unit_allows_unix_sockets_only() -> None:
    """The decision (docs/interface.md): AF_UNIX only; tcp: needs the documented drop-in,
    which adds exactly the inet families."""
    assert [line for line in unit_lines() if line.startswith("RestrictAddressFamilies=")] == [
        "RestrictAddressFamilies=AF_UNIX"
    ]
    drop_in = documented_drop_in().splitlines()
    assert "[Service]" in drop_in
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in drop_in


@pytest.fixture
def unit_dir(tmp_path: Path) -> Iterator[Path]:
    """The unit as meson installs it (an executable at @bindir@), with the drop-in."""
    ensure_packages("systemd")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "xdg-containers"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    units = tmp_path / "units"
    (units / "xdg-containers.service.d").mkdir(parents=True)
    (units / "xdg-containers.service").write_text(
        UNIT.read_text().replace("@bindir@", str(bindir))
    )
    yield units


def verify(units: Path, runtime_dir: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze --user verify`` of the unit, drop-ins in its .d included."""
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{units}:", XDG_RUNTIME_DIR=runtime_dir)
    return subprocess.run(
        ["systemd-analyze", "--user", "verify", str(units / "xdg-containers.service")],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )


def test_unit_and_documented_drop_in_verify(unit_dir: Path, runtime_dir: str) -> None:
    """systemd-analyze finds nothing to say about the unit, nor with the drop-in (and does
    complain about a bad family, so silence means it read the drop-in)."""
    plain = verify(unit_dir, runtime_dir)
    assert (plain.returncode, plain.stdout + plain.stderr) == (0, "")
    drop_in = unit_dir / "xdg-containers.service.d" / "tcp.conf"
    drop_in.write_text(documented_drop_in())
    with_drop_in = verify(unit_dir, runtime_dir)
    assert (with_drop_in.returncode, with_drop_in.stdout + with_drop_in.stderr) == (0, "")
    drop_in.write_text("[Service]\nRestrictAddressFamilies=AF_UNIX AF_NOPE\n")
    bad = verify(unit_dir, runtime_dir)
    assert "AF_NOPE" in bad.stdout + bad.stderr


@pytest.fixture
def listening_tcp_port() -> Iterator[int]:
    """A port something listens on (without the restriction a tcp: Bus there passes)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield int(s.getsockname()[1])
    s.close()


async def test_service_under_the_units_restriction(
    bus: PrivateBus, runtime_dir: str, tmp_path: Path, listening_tcp_port: int
) -> None:
    """Under RestrictAddressFamilies=AF_UNIX (as a seccomp filter) the service starts and
    serves unix buses, anchors included; a tcp: Bus is InvalidArgs naming the address and
    'Address family not supported by protocol', as documented."""
    ensure_packages("python3-seccomp")
    system_python = shutil.which("python3", path="/usr/bin")
    assert system_python is not None
    wrapper = tmp_path / "restrict.py"
    wrapper.write_text(RESTRICT)
    service = start_service(
        bus.address, runtime_dir, prefix=[system_python, str(wrapper)]
    )
    manager = await connect(bus.address)
    try:
        path, results = await add_server(manager)
        client = await connect(results["Address"].value)
        try:
            info = ok(await call(manager, "GetConnectionInfo", "s", [client.unique_name]))
            assert info[0] == path
        finally:
            client.disconnect()
        tcp = f"tcp:host=127.0.0.1,port={listening_tcp_port}"
        text = error(
            await call(
                manager,
                "AddServer",
                "sssa{sv}a{sv}",
                ["org.example.T", "a", "i", {}, {BUS_ARG: Variant("s", tcp)}],
            ),
            "InvalidArgs",
        )
        assert tcp in text and "Address family not supported by protocol" in text, text
        assert service.process.poll() is None, service.log()
    finally:
        manager.disconnect()
        rc = service.terminate()
        log = service.log()
        os.unlink(service.log_path)
    assert rc == 0, log
