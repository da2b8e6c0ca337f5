"""`meson install` puts every file where Python, D-Bus activation and systemd look.

Configures the checkout into a temporary build dir with ``--prefix=/usr``,
installs into a temporary DESTDIR and checks the installed tree: the package,
the launcher (which must run), the C anchor (which must run, and which the
installed package must find), the activation file, the systemd user unit and
the introspection XML. Fails, never skips, when meson is missing:
tools/bootstrap installs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUS_NAME = "org.freedesktop.DBus.Containers1"


def meson_command() -> list[str]:
    """meson from the test's venv, else PATH, else an importable mesonbuild."""
    venv_meson = Path(sys.executable).parent / "meson"
    if venv_meson.is_file() and os.access(venv_meson, os.X_OK):
        return [str(venv_meson)]
    found = shutil.which("meson")
    if found:
        return [found]
    if importlib.util.find_spec("mesonbuild") is None:
        pytest.fail("meson not found on PATH nor in this Python: run tools/bootstrap")
    return [sys.executable, "-m", "mesonbuild.mesonmain"]


def run(
    cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=cwd)
    assert proc.returncode == 0, (
        f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc


def under(destdir: Path, installed: str) -> Path:
    return destdir / Path(installed).relative_to("/")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(DESTDIR, {source or build file: absolute install path})."""
    tmp = tmp_path_factory.mktemp("meson")
    build, destdir = tmp / "build", tmp / "dest"
    meson = meson_command()
    # The launcher's interpreter is this one, so it can run here with the
    # dependencies (dbus-fast, ...) of the test environment.
    run([*meson, "setup", str(build), str(ROOT), "--prefix=/usr", f"-Dpython={sys.executable}"])
    run([*meson, "install", "-C", str(build), "--destdir", str(destdir)])
    listing = run([*meson, "introspect", "--installed", str(build)]).stdout
    return destdir, json.loads(listing)


@pytest.fixture(scope="module")
def installed_at_prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real install (no DESTDIR) under a temporary prefix, so installed paths exist."""
    tmp = tmp_path_factory.mktemp("meson-prefix")
    build, prefix = tmp / "build", tmp / "prefix"
    meson = meson_command()
    run([*meson, "setup", str(build), str(ROOT), f"--prefix={prefix}",
         f"-Dpython={sys.executable}", "-Danchor=enabled"])
    run([*meson, "install", "-C", str(build)])
    return prefix


def installed_path(installed: tuple[Path, dict[str, str]], suffix: str) -> Path:
    destdir, mapping = installed
    hits = [dst for dst in mapping.values() if dst.endswith(suffix)]
    assert len(hits) == 1, f"expected one installed file ending in {suffix}, got {hits}"
    return under(destdir, hits[0])


def purelib(installed: tuple[Path, dict[str, str]]) -> Path:
    return installed_path(installed, "/xdg_containers/__init__.py").parent.parent


def test_every_listed_file_is_installed(installed: tuple[Path, dict[str, str]]) -> None:
    destdir, mapping = installed
    missing = [dst for dst in mapping.values() if not under(destdir, dst).is_file()]
    assert not missing


def test_package_installed_under_purelib(installed: tuple[Path, dict[str, str]]) -> None:
    lib = purelib(installed)
    assert (lib / "xdg_containers" / "__init__.py").is_file()
    assert (lib / "xdg_containers" / "cli.py").is_file()
    # Every module of the checkout, subpackages included, and no bytecode.
    src = ROOT / "xdg_containers"
    for path in src.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(ROOT)
        assert (lib / rel).is_file(), f"{rel} not installed"
    assert not list((lib / "xdg_containers").rglob("__pycache__"))


def test_launcher_is_executable(installed: tuple[Path, dict[str, str]]) -> None:
    destdir, _ = installed
    launcher = destdir / "usr" / "bin" / "xdg-containers"
    assert launcher.is_file()
    assert os.access(launcher, os.X_OK)
    assert launcher.read_text().startswith(f"#!{sys.executable}\n")


def test_activation_file(installed: tuple[Path, dict[str, str]]) -> None:
    destdir, _ = installed
    service = destdir / "usr" / "share" / "dbus-1" / "services" / f"{BUS_NAME}.service"
    lines = service.read_text().splitlines()
    assert lines[0] == "[D-BUS Service]"
    assert f"Name={BUS_NAME}" in lines
    assert "Exec=/usr/bin/xdg-containers serve --session" in lines
    assert "SystemdService=xdg-containers.service" in lines
    assert "@" not in service.read_text()


def test_systemd_user_unit(installed: tuple[Path, dict[str, str]]) -> None:
    destdir, _ = installed
    unit = destdir / "usr" / "lib" / "systemd" / "user" / "xdg-containers.service"
    text = unit.read_text()
    lines = text.splitlines()
    assert "Type=dbus" in lines
    assert f"BusName={BUS_NAME}" in lines
    assert any(line.startswith("ExecStart=/usr/bin/xdg-containers ") for line in lines)
    assert "@" not in text


def test_interface_xml(installed: tuple[Path, dict[str, str]]) -> None:
    destdir, _ = installed
    name = f"{BUS_NAME}.xml"
    xml = destdir / "usr" / "share" / "dbus-1" / "interfaces" / name
    assert xml.read_bytes() == (ROOT / "data" / "dbus-1" / "interfaces" / name).read_bytes()


def test_installed_launcher_runs(installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    destdir, _ = installed
    lib = purelib(installed)
    env = {**os.environ, "PYTHONPATH": str(lib)}
    # Run outside the checkout so that nothing imports its copy of the package.
    where = run(
        [sys.executable, "-c", "import xdg_containers; print(xdg_containers.__file__)"],
        env=env,
        cwd=tmp_path,
    ).stdout.strip()
    assert Path(where).is_relative_to(lib), where
    launcher = destdir / "usr" / "bin" / "xdg-containers"
    proc = run([str(launcher), "--help"], env=env, cwd=tmp_path)
    assert "serve" in proc.stdout


def test_example_config_installed(installed: tuple[Path, dict[str, str]]) -> None:
    destdir, _ = installed
    conf = destdir / "usr" / "share" / "xdg-containers" / "xdg-containers.conf"
    assert conf.read_text() == (ROOT / "data" / "config" / "xdg-containers.conf").read_text()


ANCHOR = "/usr/libexec/xdg-containers-anchor"


def test_anchor_installed_and_named(installed: tuple[Path, dict[str, str]]) -> None:
    """The C anchor is in libexecdir; _installed.py beside the package names that path; no
    C source in the package."""
    destdir, _ = installed
    binary = under(destdir, ANCHOR)
    assert binary.is_file() and os.access(binary, os.X_OK)
    generated = purelib(installed) / "xdg_containers" / "anchor" / "_installed.py"
    namespace: dict[str, object] = {}
    exec(generated.read_text(), namespace)
    assert namespace["ANCHOR"] == ANCHOR
    assert not list((purelib(installed) / "xdg_containers").rglob("*.c"))
    assert not (ROOT / "xdg_containers" / "anchor" / "_installed.py").exists()


def test_installed_anchor_runs(installed: tuple[Path, dict[str, str]]) -> None:
    """The installed binary speaks the protocol: an error answer, then exit 0 on EOF."""
    destdir, _ = installed
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([str(under(destdir, ANCHOR)), "serve", str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        ours.settimeout(20)
        ours.send(b"tcp:host=localhost,port=1")
        answer = ours.recv(2048)
        assert answer.startswith(b"\x01") and b"no unix:path=" in answer
        ours.close()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_installed_package_finds_its_anchor(installed_at_prefix: Path, tmp_path: Path) -> None:
    """The installed package runs the installed binary, ahead of <sys.prefix>/libexec."""
    prefix = installed_at_prefix
    libs = list(prefix.rglob("xdg_containers/__init__.py"))
    assert len(libs) == 1, libs
    env = {k: v for k, v in os.environ.items() if k != "XDG_CONTAINERS_ANCHOR"}
    env["PYTHONPATH"] = str(libs[0].parent.parent)
    probe = (
        "import xdg_containers, json; from xdg_containers.anchor.binary import anchor_command; "
        "print(json.dumps([xdg_containers.__file__, anchor_command()]))"
    )
    where, command = json.loads(run([sys.executable, "-c", probe], env=env, cwd=tmp_path).stdout)
    assert Path(where).is_relative_to(prefix), where
    assert command == [str(prefix / "libexec" / "xdg-containers-anchor")]


def test_installed_dropin_runs(installed_at_prefix: Path, tmp_path: Path) -> None:
    """bin/xdg-containers-dbus-proxy (SPEC 11) is the C front (anchor=enabled builds C),
    which execs libexec's Python drop-in (-IS: no site before the sync byte); its
    in-process mode finds dbus-fast all the same."""
    from tests.support.bus import started_bus

    dropin = installed_at_prefix / "bin" / "xdg-containers-dbus-proxy"
    assert os.access(dropin, os.X_OK)
    assert dropin.read_bytes().startswith(b"\x7fELF")
    script = installed_at_prefix / "libexec" / "xdg-containers-dbus-proxy-py"
    assert script.read_text().startswith(f"#!{sys.executable} -IS\n")
    assert "xdg-containers-dbus-proxy" in run([str(dropin), "--version"], cwd=tmp_path).stdout
    bus = started_bus()
    try:
        r, w = os.pipe()
        path = tmp_path / "proxy"
        env = {**os.environ, "XDG_CONTAINERS_DROPIN_MODE": "in-process"}
        proc = subprocess.Popen([str(dropin), f"--fd={w}", bus.address, str(path)],
                                pass_fds=[w], env=env, cwd=tmp_path, stderr=subprocess.PIPE)
        os.close(w)
        assert os.read(r, 1) == b"x"
        done = subprocess.run(
            ["dbus-send", f"--bus=unix:path={path}", "--print-reply",
             "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
             "org.freedesktop.DBus.GetId"], capture_output=True, text=True, timeout=30,
        )
        assert done.returncode == 0, done.stderr
        os.close(r)
        assert proc.wait(30) == 0
        assert not path.exists()
    finally:
        bus.stop()
