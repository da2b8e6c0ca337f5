"""Which anchor program runs: the C ``xdg-containers-anchor`` when built, else ``program.py``.

Both speak the same protocol on the same command line (``serve FD``, ``zygote FD
KIND``). The C one costs a few pages per forked anchor instead of a CPython
child's ~850 KiB, which is what keeps 1000 anchors under 1000 xdg-dbus-proxies.
"""

from __future__ import annotations

import os
import sys

#: program.py, run by path with ``python -I -S`` (it imports only the stdlib).
PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "program.py")
#: Environment override: a path to an anchor binary, or ``python`` for program.py.
ENV = "XDG_CONTAINERS_ANCHOR"
BINARY = "xdg-containers-anchor"


def _installed() -> str | None:
    """The path meson installed the binary to (``_installed.py`` exists only when installed)."""
    try:
        from xdg_containers.anchor._installed import ANCHOR  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return str(ANCHOR)


def _executable(path: str | None) -> bool:
    return path is not None and os.path.isfile(path) and os.access(path, os.X_OK)


def python_command() -> list[str]:
    """program.py under this interpreter, isolated (it imports only the stdlib)."""
    return [sys.executable, "-I", "-S", PROGRAM]


def anchor_command() -> list[str]:
    """The command prefix for an anchor: ``$XDG_CONTAINERS_ANCHOR`` (a path, or ``python``),
    else the meson-installed binary, else ``<sys.prefix>/libexec``'s, else program.py."""
    override = os.environ.get(ENV, "")
    if override == "python":
        return python_command()
    if override:
        return [os.path.abspath(override)]
    installed = _installed()
    if _executable(installed):
        return [str(installed)]
    beside = os.path.join(sys.prefix, "libexec", BINARY)
    if _executable(beside):
        return [beside]
    return python_command()


def describe(command: list[str]) -> str:
    """One phrase for logs: which anchor program a command runs."""
    if command[-1:] == [PROGRAM]:
        return f"the Python anchor ({PROGRAM})"
    return f"the C anchor ({command[0]})"
