"""The two forms of ``xdg-containers-dbus-proxy`` for tests: the Python script (as meson
installs it without a C compiler, and as its libexec half) and the C front built here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRONT_SOURCE = os.path.join(REPO, "xdg_containers", "app", "dropin", "front.c")
#: The Connector answer the front's anchor loop shares with the C anchor.
ANSWER_SOURCE = os.path.join(REPO, "xdg_containers", "anchor", "answer.c")


def python_dropin(directory: str) -> str:
    """A ``#!python -IS`` script running this checkout's drop-in (meson's, with the
    checkout on sys.path)."""
    path = os.path.join(directory, "xdg-containers-dbus-proxy-py")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(
            f"#!{sys.executable} -IS\nimport sys\nsys.path.insert(0, {REPO!r})\n"
            "from xdg_containers.app.dropin.main import main\nsys.exit(main())\n"
        )
    os.chmod(path, 0o755)
    return path


def front_dropin(directory: str) -> str:
    """The C front, compiled here, exec'ing ``python_dropin`` of the same directory."""
    script = python_dropin(directory)
    out = os.path.join(directory, "xdg-containers-dbus-proxy")
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None, "no C compiler (tools/bootstrap installs build-essential)"
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", "-D_GNU_SOURCE",
         f'-DDROPIN_SCRIPT="{script}"', "-o", out, FRONT_SOURCE, ANSWER_SOURCE],
        check=True, capture_output=True,
    )
    return out


def dropin_programs(directory: str) -> dict[str, str]:
    """Both forms, by name: ``python`` and ``front``."""
    py_dir = os.path.join(directory, "py")
    c_dir = os.path.join(directory, "c")
    os.makedirs(py_dir, exist_ok=True)
    os.makedirs(c_dir, exist_ok=True)
    return {"python": python_dropin(py_dir), "front": front_dropin(c_dir)}
