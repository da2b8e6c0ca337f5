"""Keeps what a restart needs in step with the live registry (SPEC 13).

Every listening server has a record: written when AddServer made it and after each
SetPolicy, removed once it stops listening (only listening servers are brought back).
A record that cannot be stored (metadata holding an fd) is skipped with one log line:
that server simply would not come back. With a fd store (service/fdstore.py), the
server's listening socket, its anchor's Connector and its StopOnNotify fd are kept
there as ``cN.listen``, ``cN.connector`` and ``cN.notify``, so that they outlive a crash.
"""

from __future__ import annotations

import logging
import os

from xdg_containers.servers.record import ServerRecord
from xdg_containers.servers.server import ContainerServer
from xdg_containers.servers.store import RegistryStore, default_directory
from xdg_containers.servers.valuejson import SignatureError
from xdg_containers.service.fdcommon import FdStore

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


#: What a server keeps in the fd store, by the suffix of its name there.
KEPT_FDS = ("listen", "connector", "notify")


def _identity(fd: int | None) -> tuple[int, int, int] | None:
    """An fd and the open file it is (a new fd may reuse an old one's number)."""
    if fd is None:
        return None
    st = os.fstat(fd)
    return (fd, st.st_dev, st.st_ino)


def kept_fds(server: ContainerServer) -> dict[str, int | None]:
    """The fds of ``server`` a restart needs, by kind (None: it has none of that kind)."""
    listen, notify = server.handover_fds
    anchor = server.anchor
    connector = anchor.sock.fileno() if anchor is not None and not anchor.closed else None
    return {"listen": listen, "connector": connector, "notify": notify}


class Persistence:
    """Writes and removes the records of one service's servers, and their kept fds."""

    def __init__(self, store: RegistryStore | None, fds: FdStore | None = None) -> None:
        """``store`` None: nothing is kept (no XDG_RUNTIME_DIR, or it was refused);
        ``fds`` None: no fd store (listening sockets die with the process)."""
        self.store = store
        self.fds = fds
        # path -> what was last stored, by kind (fd, device, inode)
        self._kept: dict[str, dict[str, tuple[int, int, int] | None]] = {}

    def save(self, server: ContainerServer) -> None:
        """Write ``server``'s record (after AddServer, SetPolicy, a restore or a
        re-registration) and keep its fds, if it still listens."""
        if self.store is None or not server.listening:
            return
        try:
            self.store.save(record_of(server))
        except SignatureError as exc:
            log.warning("%s: not kept for a restart: %s", server.path, exc)
            return
        except OSError as exc:
            log.warning("%s: cannot write its record under %s: %s", server.path,
                        self.store.directory, exc)
            return
        self._keep_fds(server)

    def _keep_fds(self, server: ContainerServer) -> None:
        if self.fds is None:
            return
        number = server.path.rsplit("/", 1)[-1]
        now = {kind: _identity(fd) for kind, fd in kept_fds(server).items()}
        before = self._kept.get(server.path, {})
        for kind, ident in now.items():
            if ident == before.get(kind):
                continue  # kept already (SetPolicy changes no fd)
            if ident is None:
                self.fds.remove(f"{number}.{kind}")
            else:
                self.fds.store(f"{number}.{kind}", ident[0])
        self._kept[server.path] = now

    def forget(self, server: ContainerServer) -> None:
        """Remove ``server``'s record and kept fds: it stopped listening or was removed."""
        if self.store is None or server.listening:
            return
        self.drop(server.path)

    def drop(self, path: str) -> None:
        """Remove the record and kept fds of the server at ``path``."""
        try:
            if self.store is not None:
                self.store.remove(path)
        except OSError as exc:
            log.warning("%s: cannot remove its record: %s", path, exc)
        kept = self._kept.pop(path, None)
        if self.fds is not None:
            number = path.rsplit("/", 1)[-1]
            for kind in KEPT_FDS:
                if kept is None or kept.get(kind) is not None:
                    self.fds.remove(f"{number}.{kind}")

    def close(self) -> None:
        """A clean stop: nothing is to come back, the fd store lets go of everything."""
        if self.fds is not None:
            self.fds.close()
            self.fds = None
