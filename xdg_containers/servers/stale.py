"""Sockets left in our runtime directory by a run that did not stop cleanly.

A killed service cannot unlink its sockets. Those of servers the next run brings back
are bound again or kept (service/restore.py); the rest are removed here, unless
something still listens on them.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

from xdg_containers.servers.spec import runtime_socket_dir

log = logging.getLogger("xdg_containers.service.daemon")


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
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(entry.path)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except OSError:
                    pass
        finally:
            probe.close()
    if removed:
        log.info(
            "removed %d stale socket(s) from %s (left by an earlier run that did not stop "
            "cleanly; their clients had already lost their connection)",
            removed,
            directory,
        )
    return removed
