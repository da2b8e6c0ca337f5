"""Sockets left in our runtime directory by a run that did not stop cleanly.

A killed service cannot unlink its sockets. Those of servers the next run brings back
are bound again or kept (service/restore.py); the rest are removed here, unless
something still listens on them.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import stat

from xdg_containers.servers.spec import runtime_socket_dir

log = logging.getLogger("xdg_containers.service.daemon")


#: How the service names the sockets it mints (ContainerServer.listen_new).
MINTED_NAME = re.compile(r"dbus-[0-9a-f]{16}")


def is_minted(socket_path: str) -> bool:
    """Whether ``socket_path`` is where this service mints sockets, named as it names
    them (a record's path is untrusted: nothing else may be bound or unlinked)."""
    return (os.path.dirname(socket_path) == runtime_socket_dir()
            and MINTED_NAME.fullmatch(os.path.basename(socket_path)) is not None)


def nobody_listens(socket_path: str) -> bool:
    """Whether a connect() to ``socket_path`` is refused (or finds nothing there)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(socket_path)
    except OSError as exc:
        return exc.errno in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return False


def remove_stale_sockets() -> int:
    """Unlink sockets in our runtime dir that nobody listens on (a killed earlier run)."""
    try:
        directory = runtime_socket_dir()
    except OSError:
        return 0
    removed = 0
    for entry in os.scandir(directory):
        if not entry.name.startswith("dbus-") or not stat.S_ISSOCK(entry.stat().st_mode):
            continue
        if nobody_listens(entry.path):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    if removed:
        log.info(
            "removed %d stale socket(s) from %s (left by an earlier run that did not stop "
            "cleanly; their clients had already lost their connection)",
            removed,
            directory,
        )
    return removed
