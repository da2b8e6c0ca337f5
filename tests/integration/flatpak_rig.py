"""A real flatpak 1.14 set-up for tests: a tiny runtime made of host binaries and one app.

Built once per test session under a temporary HOME (``flatpak --user``, a local
repo without GPG, no network): the runtime holds sh, dbus-send, gdbus,
dbus-test-tool and their libraries; the app ``org.example.App`` runs ``sh`` with
the arguments given to ``flatpak run`` and has a fixed session-bus policy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from tests.support.dropin import dropin_programs
from tests.support.packages import ensure_packages

APP = "org.example.App"
BINARIES = (
    "sh", "dbus-send", "gdbus", "dbus-test-tool", "cat", "sleep", "true", "sed", "tr", "sort",
)
#: The app's own policy (flatpak adds --own=APP.* and the portal rules itself).
APP_POLICY = {"org.example.Talk": "talk", "org.example.Own": "own", "org.example.See": "see"}


@dataclass
class FlatpakRig:
    """Where the installation lives, and the environment ``flatpak run`` needs."""

    root: str
    home: str
    #: the drop-in's two forms: ``python`` (script) and ``front`` (C front + script)
    dropins: dict[str, str]

    def env(self, bus_address: str, runtime_dir: str, proxy: str | None) -> dict[str, str]:
        """``flatpak run``'s environment; ``proxy`` is FLATPAK_DBUSPROXY (None: xdg-dbus-proxy)."""
        env = dict(os.environ)
        env.update(
            HOME=self.home,
            XDG_DATA_HOME=os.path.join(self.home, ".local", "share"),
            XDG_RUNTIME_DIR=runtime_dir,
            DBUS_SESSION_BUS_ADDRESS=bus_address,
        )
        env.pop("FLATPAK_DBUSPROXY", None)
        if proxy is not None:
            env["FLATPAK_DBUSPROXY"] = proxy
        return env


def _run(argv: list[str], env: dict[str, str], cwd: str) -> None:
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stdout}\n{done.stderr}")


def _copy_runtime_files(files: str) -> None:
    bindir = os.path.join(files, "bin")
    os.makedirs(bindir)
    os.makedirs(os.path.join(files, "etc"))
    libs: set[str] = set()
    for name in BINARIES:
        found = shutil.which(name)
        assert found is not None, name
        real = os.path.realpath(found)
        shutil.copy(real, os.path.join(bindir, name))
        out = subprocess.run(["ldd", real], capture_output=True, text=True, check=True).stdout
        for word in out.split():
            if word.startswith("/"):
                libs.add(word)
    for lib in libs:
        # The runtime is mounted at /usr, and /lib64 links to usr/lib64.
        rel = lib[len("/usr") :] if lib.startswith("/usr/") else lib
        dest = os.path.join(files, rel.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy(os.path.realpath(lib), dest)


def build_rig(root: str) -> FlatpakRig:
    """Install the runtime (as Platform and Sdk) and the app under ``root``."""
    ensure_packages("flatpak", "dbus-tests")
    home = os.path.join(root, "home")
    os.makedirs(home)
    env = dict(os.environ, HOME=home, XDG_DATA_HOME=os.path.join(home, ".local", "share"))
    repo = os.path.join(root, "repo")
    rt = os.path.join(root, "runtime")
    _copy_runtime_files(os.path.join(rt, "files"))
    for name in ("org.example.Platform", "org.example.Sdk"):
        with open(os.path.join(rt, "metadata"), "w", encoding="utf-8") as fh:
            fh.write(
                f"[Runtime]\nname={name}\nruntime=org.example.Platform/x86_64/1\n"
                "sdk=org.example.Sdk/x86_64/1\n"
            )
        _run(["flatpak", "build-export", "--runtime", "--files=files", repo, rt, "1"], env, root)
    _run(["flatpak", "remote-add", "--user", "--no-gpg-verify", "local", repo], env, root)
    _run(
        ["flatpak", "install", "--user", "-y", "--noninteractive", "local",
         "org.example.Platform//1", "org.example.Sdk//1"],
        env, root,
    )
    app = os.path.join(root, "app")
    _run(["flatpak", "build-init", app, APP, "org.example.Sdk", "org.example.Platform", "1"],
         env, root)
    os.makedirs(os.path.join(app, "files", "bin"))
    with open(os.path.join(app, "files", "bin", "app"), "w", encoding="utf-8") as fh:
        fh.write('#!/bin/sh\nexec sh "$@"\n')
    os.chmod(os.path.join(app, "files", "bin", "app"), 0o755)
    finish = ["flatpak", "build-finish", app, "--command=app"]
    for name, level in APP_POLICY.items():
        if level == "see":
            finish.append(f"--metadata=Session Bus Policy={name}=see")
        else:
            finish.append(f"--{level}-name={name}")
    _run(finish, env, root)
    _run(["flatpak", "build-export", repo, app, "1"], env, root)
    _run(["flatpak", "install", "--user", "-y", "--noninteractive", "local", f"{APP}//1"],
         env, root)
    return FlatpakRig(root, home, dropin_programs(os.path.join(root, "dropin")))
