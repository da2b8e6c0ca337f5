"""Listening sockets kept outside the service, so a crash does not lose them (SPEC 13).

Two backends behind one small interface (docs/fdstore.md):

- systemd's fd store, when ``$NOTIFY_SOCKET`` is set (``fdsystemd``): ``FDSTORE=1`` and
  ``FDSTOREREMOVE=1`` notify datagrams; the restarted service gets the fds as
  ``LISTEN_FDS``/``LISTEN_FDNAMES``;
- otherwise the fd keeper (``fdkeeper``, started on first use, ``fdkeeperlink`` talks to
  it), speaking the same messages over a unix socket under ``$XDG_RUNTIME_DIR``.
"""

from __future__ import annotations

import os

from xdg_containers.service.fdcommon import FdStore, check_name, log
from xdg_containers.service.fdkeeperlink import keeper_store
from xdg_containers.service.fdsystemd import SystemdFdStore, notify_address

__all__ = ["FdStore", "check_name", "open_fd_store"]


def open_fd_store(scope: str, bus_address: str | None = None) -> FdStore | None:
    """The fd store for the service on the bus whose id is ``scope``: systemd's when
    ``$NOTIFY_SOCKET`` is set, else a keeper under ``$XDG_RUNTIME_DIR`` (that starts the
    service on ``bus_address`` when a client waits on a kept socket); None, logged with
    why, when neither can be used."""
    if not scope.isalnum() or not scope.isascii() or len(scope) > 64:
        raise ValueError(f"fd store scope {scope[:80]!r} is not a short alphanumeric id")
    notify = os.environ.get("NOTIFY_SOCKET")
    if notify:
        if os.environ.get("FDSTORE") == "0":
            log.warning("no fd store: systemd says FileDescriptorStoreMax=0 for this unit; "
                        "servers will not come back after a crash")
            return None
        try:
            return SystemdFdStore(notify_address(notify))
        except ValueError as exc:
            log.warning("no fd store: %s", exc)
            return None
    return keeper_store(scope, bus_address)
