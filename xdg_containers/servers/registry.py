"""Bookkeeping of live servers and confined connections; no I/O.

Answers "is this unique name one of ours, and whose?", enforces the server
limits, and hands out never-reused object paths. Changes are reported to
listeners (the D-Bus service) so that one place emits signals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from xdg_containers.config import Limits
from xdg_containers.servers.adopted import AdoptedConnection

if TYPE_CHECKING:
    from xdg_containers.servers.adopted import Confined as Session
    from xdg_containers.servers.server import ContainerServer

SERVER_PATH_PREFIX = "/org/freedesktop/DBus/Containers1/c"


class LimitError(Exception):
    """A configured limit would be exceeded."""


class ServerRegistry:
    """All servers of this service instance, by path, creator uid and connection name."""

    def __init__(self, limits: Limits) -> None:
        """Start empty; paths count from c0."""
        self.limits = limits
        self._next = 0
        self._servers: dict[str, ContainerServer] = {}
        # Creator's unique name -> its servers: every departure on the bus asks.
        self._by_creator: dict[str, dict[str, ContainerServer]] = {}
        self._per_uid: dict[int, int] = {}
        self._sessions: dict[str, Session] = {}
        self.on_removed: list[Callable[[ContainerServer], None]] = []
        self.on_connections_changed: list[Callable[[ContainerServer], None]] = []
        self.on_listening_changed: list[Callable[[ContainerServer], None]] = []

    def check_can_add(self, uid: int) -> None:
        """Raise LimitError if one more server for ``uid`` is over a limit."""
        if len(self._servers) >= self.limits.max_servers:
            raise LimitError(
                f"the service already has {len(self._servers)} servers "
                f"(max_servers={self.limits.max_servers})"
            )
        n = self._per_uid.get(uid, 0)
        if n >= self.limits.max_servers_per_uid:
            raise LimitError(
                f"uid {uid} already has {n} servers "
                f"(max_servers_per_uid={self.limits.max_servers_per_uid})"
            )

    def allocate_path(self) -> str:
        """A fresh server object path; never reused while the service runs."""
        path = f"{SERVER_PATH_PREFIX}{self._next}"
        self._next += 1
        return path

    def reserve(self, path: str) -> None:
        """``path`` (``...cN``) is taken by a restored server: never hand it out again."""
        self._next = max(self._next, int(path[len(SERVER_PATH_PREFIX):]) + 1)

    def add(self, server: ContainerServer) -> None:
        """Register a server that has started listening."""
        self.check_can_add(server.creator_uid)
        self._servers[server.path] = server
        self._by_creator.setdefault(server.creator_name, {})[server.path] = server
        self._per_uid[server.creator_uid] = self._per_uid.get(server.creator_uid, 0) + 1

    def change_creator(self, server: ContainerServer, unique_name: str) -> None:
        """``server`` belongs to ``unique_name`` now (its launcher registered it again
        from another connection): StopOnDisconnect follows that connection."""
        mine = self._by_creator.get(server.creator_name)
        if mine is not None:
            mine.pop(server.path, None)
            if not mine:
                del self._by_creator[server.creator_name]
        server.spec.creator_name = unique_name
        self._by_creator.setdefault(unique_name, {})[server.path] = server

    def get(self, path: str) -> ContainerServer | None:
        """The live server at ``path``."""
        return self._servers.get(path)

    def __iter__(self) -> Iterator[ContainerServer]:
        return iter(list(self._servers.values()))

    def __len__(self) -> int:
        return len(self._servers)

    def servers_created_by(self, unique_name: str) -> list[ContainerServer]:
        """Servers whose AddServer caller had this unique name."""
        return list(self._by_creator.get(unique_name, {}).values())

    # -- events from servers ---------------------------------------------------------

    def server_finished(self, server: ContainerServer) -> None:
        """A server is neither listening nor has connections: forget it, tell listeners."""
        if self._servers.pop(server.path, None) is None:
            return
        mine = self._by_creator.get(server.creator_name)
        if mine is not None:
            mine.pop(server.path, None)
            if not mine:
                del self._by_creator[server.creator_name]
        n = self._per_uid.get(server.creator_uid, 1) - 1
        if n:
            self._per_uid[server.creator_uid] = n
        else:
            self._per_uid.pop(server.creator_uid, None)
        for cb in self.on_removed:
            cb(server)

    def session_named(self, session: Session) -> None:
        """A confined connection got its unique name from the bus.

        Only connections proxied to the service's own bus enter the name table:
        unique names are unique per bus, so one from another bus must never
        shadow (or be taken for) a peer of ours.
        """
        assert session.unique_name is not None
        if session.server.on_service_bus:
            self._sessions[session.unique_name] = session
        for cb in self.on_connections_changed:
            cb(session.server)

    def session_closed(self, session: Session) -> None:
        """A confined connection went away."""
        if session.unique_name is None:
            return
        removed = self._sessions.get(session.unique_name) is session
        if removed:
            del self._sessions[session.unique_name]
        if removed or not session.server.on_service_bus:
            for cb in self.on_connections_changed:
                cb(session.server)

    def adopt(self, conn: AdoptedConnection) -> None:
        """A connection the previous service process still forwards (hand-over)."""
        self._sessions[conn.unique_name] = conn
        conn.server.adopted[conn.unique_name] = conn
        for cb in self.on_connections_changed:
            cb(conn.server)

    def unique_name_gone(self, unique_name: str) -> None:
        """A bus peer left: if it was an adopted connection, forget it."""
        conn = self._sessions.get(unique_name)
        if not isinstance(conn, AdoptedConnection):
            return
        del self._sessions[unique_name]
        conn.close()
        for cb in self.on_connections_changed:
            cb(conn.server)
        conn.server.adopted_left(unique_name)

    def listening_changed(self, server: ContainerServer) -> None:
        """A server stopped listening."""
        for cb in self.on_listening_changed:
            cb(server)

    # -- queries ---------------------------------------------------------------------

    def session_for(self, unique_name: str) -> Session | None:
        """The confined connection with this unique name, if it is ours."""
        return self._sessions.get(unique_name)

    def is_confined(self, unique_name: str | None) -> bool:
        """Whether a bus peer is one of our confined connections."""
        return unique_name is not None and unique_name in self._sessions
