"""Handing the process to the C front's anchor loop, and taking it back (pure but exec).

Once the service serves every group, the drop-in execs ``FRONT --anchor-loop`` (same
pid, ~100 KiB): it answers the Connector requests and watches the sync fd. When a
Connector closes or the bus sends something (the service's name lost its owner), the
loop cannot judge it: it execs the Python drop-in again with the same arguments and
``XDG_CONTAINERS_DROPIN_RESUME`` naming the bus and Connector fds, and recovery.py
takes over. What both sides need travels in argv and the environment:

``FRONT --anchor-loop SYNC BUS CONNECTOR... -- PATH... -- ARG...`` (one CONNECTOR and
one PATH per group, ``-1`` for a group that is no more; ARGs are the drop-in's own
command line, ``--args`` already expanded by the front), with
``XDG_CONTAINERS_DROPIN_FDS`` the listening sockets (``-1`` likewise) and
``XDG_CONTAINERS_DROPIN_SERVICE`` the unique name of the service that took them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

FRONT_FDS = "XDG_CONTAINERS_DROPIN_FDS"
FRONT_EXE = "XDG_CONTAINERS_DROPIN_FRONT"
RESUME = "XDG_CONTAINERS_DROPIN_RESUME"
SERVICE_NAME = "XDG_CONTAINERS_DROPIN_SERVICE"


def anchor_loop_argv(
    program: str,
    sync_fd: int | None,
    bus_fd: int,
    connector_fds: Sequence[int],
    paths: Sequence[str],
    args: Sequence[str],
) -> list[str]:
    """The loop's command line (see the module's docstring)."""
    argv = [program, "--anchor-loop", str(-1 if sync_fd is None else sync_fd), str(bus_fd)]
    argv += [str(fd) for fd in connector_fds]
    return [*argv, "--", *paths, "--", *args]


def parse_fd_list(text: str, count: int) -> list[int]:
    """``count`` comma-separated fds (``-1`` allowed); ValueError otherwise."""
    fds = [int(x) for x in text.split(",")]
    if len(fds) != count or any(fd < -1 for fd in fds):
        raise ValueError(f"{text!r} is not {count} fds")
    return fds


class Resumed:
    """What the anchor loop handed back: the bus and Connector fds (``-1``: no more).

    A plain class: this module is on the start-up path (no dataclasses)."""

    def __init__(self, bus_fd: int, connector_fds: list[int], service_name: str) -> None:
        """``service_name`` took the groups last."""
        self.bus_fd = bus_fd
        self.connector_fds = connector_fds
        self.service_name = service_name


def parse_resume(text: str, groups: int, service_name: str) -> Resumed:
    """``XDG_CONTAINERS_DROPIN_RESUME`` = ``BUS,CONNECTOR,...``; ValueError if malformed."""
    fds = parse_fd_list(text, groups + 1)
    if fds[0] < 0:
        raise ValueError(f"{text!r} names no bus fd")
    return Resumed(fds[0], fds[1:], service_name)


def exec_anchor_loop(
    program: str,
    sync_fd: int | None,
    bus_fd: int,
    connector_fds: Sequence[int],
    listener_fds: Sequence[int],
    paths: Sequence[str],
    args: Sequence[str],
    service_name: str,
) -> None:
    """Become ``program --anchor-loop``; returns only if the exec failed (the fds are
    then close-on-exec again)."""
    keep = [fd for fd in (bus_fd, *connector_fds, *listener_fds) if fd >= 0]
    if sync_fd is not None:
        keep.append(sync_fd)
    os.environ[FRONT_FDS] = ",".join(str(fd) for fd in listener_fds)
    os.environ[FRONT_EXE] = program
    os.environ[SERVICE_NAME] = service_name
    os.environ.pop(RESUME, None)
    inheritable = {fd: os.get_inheritable(fd) for fd in keep}
    for fd in keep:
        os.set_inheritable(fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(program, anchor_loop_argv(program, sync_fd, bus_fd, connector_fds, paths, args))
    except OSError as exc:
        sys.stderr.write(f"xdg-containers-dbus-proxy: cannot run {program}: {exc}\n")
        for fd, was in inheritable.items():
            os.set_inheritable(fd, was)
        for name in (FRONT_FDS, FRONT_EXE, SERVICE_NAME):
            os.environ.pop(name, None)
