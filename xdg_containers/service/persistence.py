"""Keeps the on-disk registry in step with the live one (SPEC 13, groundwork for restarts).

Every listening server has a record: written when AddServer made it and after each
SetPolicy, removed once it stops listening (only listening servers are brought back).
A record that cannot be stored (metadata holding an fd) is skipped with one log line:
that server simply would not come back.
"""

from __future__ import annotations

import logging
import os

from xdg_containers.servers.record import ServerRecord
from xdg_containers.servers.server import ContainerServer
from xdg_containers.servers.store import RegistryStore, default_directory
from xdg_containers.servers.valuejson import SignatureError

log = logging.getLogger(__name__)


def store_for_bus(bus_id: str) -> RegistryStore:
    """The store of the servers on the bus whose id (GetId) is ``bus_id``.

    One directory per bus: two services of one user on different buses (the session
    bus, a private one) must not overwrite each other's ``cN`` records.
    """
    if not bus_id.isalnum():
        raise ValueError(f"bus id {bus_id!r} is not alphanumeric")
    return RegistryStore(os.path.join(default_directory(), bus_id))


def record_of(server: ContainerServer) -> ServerRecord:
    """What is stored of ``server``; fds in the creator's credentials are left out."""
    spec = server.spec
    creator = {k: v for k, v in spec.creator.items() if "h" not in v.signature}
    return ServerRecord(
        path=server.path,
        container_type=spec.container_type,
        app_id=spec.app_id,
        instance_id=spec.instance_id,
        metadata=dict(spec.metadata),
        creator=creator,
        creator_uid=spec.creator_uid,
        creator_name=spec.creator_name,
        bus_address=spec.bus_address,
        guid=server.guid,
        socket_path=server.socket_path,
        stop_on_disconnect=spec.stop_on_disconnect,
        log_messages=spec.log_messages,
        policy_arguments=dict(spec.policy_arguments),
        connector=spec.connector,
        stop_on_notify=spec.stop_on_notify,
        socket_id=server.socket_id,
    )


class Persistence:
    """Writes and removes the records of one service's servers."""

    def __init__(self, store: RegistryStore | None) -> None:
        """``store`` None: nothing is kept (no XDG_RUNTIME_DIR, or it was refused)."""
        self.store = store

    def save(self, server: ContainerServer) -> None:
        """Write ``server``'s record (after AddServer or SetPolicy) if it still listens."""
        if self.store is None or not server.listening:
            return
        try:
            self.store.save(record_of(server))
        except SignatureError as exc:
            log.warning("%s: not kept for a restart: %s", server.path, exc)
        except OSError as exc:
            log.warning("%s: cannot write its record under %s: %s", server.path,
                        self.store.directory, exc)

    def forget(self, server: ContainerServer) -> None:
        """Remove ``server``'s record: it stopped listening or was removed."""
        if self.store is None or server.listening:
            return
        try:
            self.store.remove(server.path)
        except OSError as exc:
            log.warning("%s: cannot remove its record: %s", server.path, exc)
