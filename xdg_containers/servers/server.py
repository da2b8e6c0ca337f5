"""One container server: its listening socket, its confined connections, its lifetime.

A server is created by AddServer, listens on a socket minted for one app
instance (or one the launcher handed in), and is removed once it no longer
listens and its last connection is gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from xdg_containers.config import Limits
from xdg_containers.core.basic_filter import BasicFilter
from xdg_containers.io.anchor_link import anchor_request
from xdg_containers.io.budget import budget_for
from xdg_containers.io.deadlines import DeadlineQueue
from xdg_containers.io.dispatch import direct_selector, watch_reads
from xdg_containers.io.peercred import read_peer_credentials
from xdg_containers.io.session import MessageFilter, Session
from xdg_containers.io.spare import spares_for
from xdg_containers.servers.denials import DenialLog
from xdg_containers.servers.shortage import ACCEPT_SHORTAGE, note_shortage
from xdg_containers.servers.spec import FilterSettings, ServerSpec, runtime_socket_dir
from xdg_containers.wire.address import escape_value
from xdg_containers.wire.header import Header

if TYPE_CHECKING:
    from xdg_containers.io.anchor_link import AnchorLink

log = logging.getLogger(__name__)

#: Seconds a server stops accepting after such an error: the listening socket is
#: level-triggered, so watching it on would fail again at once, in a busy loop.
ACCEPT_PAUSE = 0.25

class ServerSession(Session):
    """A session of a ContainerServer: the service asks it which server it came through."""

    __slots__ = ()
    server: ContainerServer


class Registry(Protocol):
    """What a server tells the registry of all servers (servers/registry.py), which
    imports this module, not the other way round."""

    @property
    def limits(self) -> Limits:
        """The service's limits."""

    def session_named(self, session: ServerSession) -> None:
        """A session learned its unique name."""

    def session_closed(self, session: ServerSession) -> None:
        """A session ended."""

    def listening_changed(self, server: ContainerServer) -> None:
        """A server started or stopped listening."""

    def server_finished(self, server: ContainerServer) -> None:
        """A server was removed and its last session ended."""


class ContainerServer:
    """A live server: listening socket plus the sessions accepted on it."""

    def __init__(
        self,
        spec: ServerSpec,
        path: str,
        registry: Registry,
        service_names: Callable[[], frozenset[str]],
        filter_factory: Callable[[ServerSession, FilterSettings], MessageFilter] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Prepare a server; call ``listen_new`` or ``listen_on`` to start it."""
        self.spec = spec
        self.path = path
        self.registry = registry
        self.limits: Limits = registry.limits
        self.loop = loop or asyncio.get_running_loop()
        self.guid = secrets.token_hex(16)
        self.socket_path: str | None = None
        #: (st_dev, st_ino) of the listening socket, to recognise it after a restart
        self.socket_id: tuple[int, int] | None = None
        self.listening = False
        self.sessions: set[ServerSession] = set()
        #: connections forwarded by the previous service process, by unique name (hand-over)
        self.adopted: dict[str, object] = {}
        self.messages_forwarded = 0
        self.messages_denied = 0
        self._service_names = service_names
        self._filter_factory = filter_factory
        self._listen_sock: socket.socket | None = None
        self._direct = direct_selector(self.loop)
        self.spares = spares_for(self.loop)  # ready bus connections, shared by all servers
        self._basic_passes: dict[bytes, str] = {}  # shared by the unfiltered connections
        # Sessions from accept until their Hello went to the bus (the auth timeout).
        self._handshakes: DeadlineQueue[ServerSession] = DeadlineQueue(
            self.loop, self.limits.auth_timeout / 1000, ServerSession.handshake_expired
        )
        # Sessions holding a message the client has not finished sending.
        self.partials: DeadlineQueue[ServerSession] = DeadlineQueue(
            self.loop,
            self.limits.idle_partial_message_timeout / 1000,
            ServerSession.partial_expired,
        )
        # Bytes held by the connections of every server (core/budget.py).
        self.budget = budget_for(self.loop, self.limits.max_buffered_bytes)
        self._accept_paused: asyncio.TimerHandle | None = None
        self._starting: ServerSession | None = None  # the session being started by accept
        self._notify_fd: int | None = None
        #: Makes this server's bus connections (SPEC 10); None: this process is the anchor.
        self.anchor: AnchorLink | None = None
        self._finished = False
        self._denials = DenialLog(path, spec.app_id)

    # -- identity --------------------------------------------------------------------

    @property
    def app_id(self) -> str:
        """The app id given to AddServer."""
        return self.spec.app_id

    @property
    def creator_uid(self) -> int:
        """Uid of the AddServer caller; the only uid allowed to connect."""
        return self.spec.creator_uid

    @property
    def creator_name(self) -> str:
        """Unique name of the AddServer caller."""
        return self.spec.creator_name

    @property
    def bus_address(self) -> str:
        """Where this server's connections are proxied to."""
        return self.spec.bus_address

    @property
    def on_service_bus(self) -> bool:
        """Whether connections are proxied to the bus the service itself is on."""
        return self.spec.on_service_bus

    @property
    def log_messages(self) -> bool:
        """Whether every message is logged (the Log named argument)."""
        return self.spec.log_messages

    @property
    def address(self) -> str:
        """The D-Bus address of the minted socket ('' for a caller-provided fd)."""
        if self.socket_path is None:
            return ""
        return f"unix:path={escape_value(self.socket_path)},guid={self.guid}"

    @property
    def service_names(self) -> frozenset[str]:
        """Our own bus names (well-known and unique), for the no-nesting rule."""
        return self._service_names()

    def connection_names(self) -> list[str]:
        """Unique names of the live, named connections."""
        return sorted([s.unique_name for s in self.sessions if s.unique_name] + [*self.adopted])

    # -- listening -------------------------------------------------------------------

    def listen_new(self) -> None:
        """Mint a filesystem socket in the runtime directory and listen on it."""
        directory = runtime_socket_dir()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        for _ in range(10):
            candidate = os.path.join(directory, "dbus-" + secrets.token_hex(8))
            try:
                sock.bind(candidate)
            except FileExistsError:
                continue
            except OSError:
                sock.close()
                raise
            self.socket_path = candidate
            break
        else:
            sock.close()
            raise OSError("could not find a free socket name")
        sock.listen(64)
        self._start(sock)

    def listen_on(self, sock: socket.socket) -> None:
        """Serve on a socket the launcher bound and made listen itself (ListenFD)."""
        self._start(sock)

    def _start(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        st = os.fstat(sock.fileno())
        self.socket_id = (st.st_dev, st.st_ino)
        self._listen_sock = sock
        self.listening = True
        # Accept straight from epoll_wait, like the proxied sockets' reads.
        watch_reads(self.loop, self._direct, sock.fileno(), self._on_accept)

    def attach_anchor(self, anchor: AnchorLink) -> None:
        """Every bus connection of this server is made by ``anchor`` from now on."""
        self.anchor = anchor
        anchor.on_lost = self.anchor_lost
        anchor.bus_request = anchor_request(self.bus_address)

    def anchor_lost(self, reason: str) -> None:
        """The Connector closed: stop listening and close every connection (SPEC 10).

        Their bus-side pid is the anchor's: once it is gone the pid could be
        reused by an unrelated process that consumers would then take for the app.
        """
        if self._finished:
            return
        log.warning(
            "%s (%s): the anchor%s is gone (%s): stopping the server and closing its %d "
            "connection(s)",
            self.path,
            self.app_id,
            f" (pid {self.anchor.pid})" if self.anchor and self.anchor.pid else "",
            reason,
            len(self.sessions),
        )
        self.stop(None)  # that line says it all: none per connection

    def watch_notify_fd(self, fd: int) -> None:
        """StopOnNotify: stop listening once ``fd`` is readable or hung up (replacing an
        earlier one: a launcher's re-registration)."""
        self._unwatch_notify()
        self._notify_fd = fd
        self.loop.add_reader(fd, self._notified)

    def _unwatch_notify(self) -> None:
        if self._notify_fd is not None:
            self.loop.remove_reader(self._notify_fd)
            try:
                os.close(self._notify_fd)
            except OSError:
                pass
            self._notify_fd = None

    def _notified(self) -> None:
        log.info("%s: StopOnNotify fd became readable; stopping listening", self.path)
        self.stop_listening()

    def _on_accept(self) -> None:
        # One per wake-up: the listening socket is level-triggered, so another
        # pending client wakes us again at once, and no accept() is spent (and no
        # exception raised) on learning that none is left.
        sock = self._listen_sock
        if sock is None:
            return
        try:
            conn, _addr = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in ACCEPT_SHORTAGE:
                self._out_of_fds(exc)
            else:
                log.warning("%s: accept failed: %s", self.path, exc)
            return
        except Exception:
            # A fault of ours in the accept path costs this server, not the service.
            log.exception("%s (%s): internal error accepting; stopping the server",
                          self.path, self.app_id)
            self.stop()
            return
        try:
            self._accepted(conn)
        except Exception as exc:
            self._accept_failed(conn, exc)

    def _accept_failed(self, conn: socket.socket, exc: Exception) -> None:
        """A fault while taking a new connection on: that connection goes, logged once."""
        if isinstance(exc, OSError) and exc.errno in ACCEPT_SHORTAGE:
            conn.close()
            self._out_of_fds(exc)
            return
        log.error("%s (%s): internal error taking a new connection on; closing it",
                  self.path, self.app_id, exc_info=exc)
        session, self._starting = self._starting, None
        if session is not None:
            try:
                session.close()
            except Exception:
                self.sessions.discard(session)
        conn.close()

    def _out_of_fds(self, exc: OSError) -> None:
        """No fd (or memory) for one more connection: stop accepting for ACCEPT_PAUSE
        (waiting clients stay in the backlog), and say so at most once a second."""
        note_shortage(exc)
        sock = self._listen_sock
        if sock is None or self._accept_paused is not None:
            return
        watch_reads(self.loop, self._direct, sock.fileno(), None)
        self._accept_paused = self.loop.call_later(ACCEPT_PAUSE, self._resume_accept)

    def _resume_accept(self) -> None:
        self._accept_paused = None
        sock = self._listen_sock
        if sock is not None:
            watch_reads(self.loop, self._direct, sock.fileno(), self._on_accept)

    def _accepted(self, conn: socket.socket) -> None:
        if len(self.sessions) >= self.limits.max_connections_per_server:
            log.warning(
                "%s (%s): refusing connection: max_connections_per_server=%d reached",
                self.path,
                self.app_id,
                self.limits.max_connections_per_server,
            )
            conn.close()
            return
        try:
            creds = read_peer_credentials(conn, complete=False)
        except OSError as exc:
            conn.close()
            if exc.errno in ACCEPT_SHORTAGE:
                self._out_of_fds(exc)  # no fd for its pidfd: as for accept itself
            else:
                log.warning("%s: cannot read peer credentials: %s", self.path, exc)
            return
        if creds.uid != self.creator_uid:
            log.warning(
                "%s (%s): refusing connection from uid %d pid %d: only uid %d may connect",
                self.path,
                self.app_id,
                creds.uid,
                creds.pid,
                self.creator_uid,
            )
            creds.close()
            conn.close()
            return
        conn.setblocking(False)
        session = ServerSession(self, conn, creds, self.loop)
        self.sessions.add(session)
        self._starting = session
        session.start()
        self._starting = None

    @property
    def handover_fds(self) -> tuple[int | None, int | None]:
        """The listening socket's and StopOnNotify's fds (``serve --replace`` dups them)."""
        sock = self._listen_sock
        return (sock.fileno() if sock is not None else None), self._notify_fd

    def stop_listening(self, unlink: bool = True) -> None:
        """Close and unlink the listening socket; existing connections carry on.
        ``unlink`` False: a new service process listens on it now."""
        self._unwatch_notify()
        if self._accept_paused is not None:
            self._accept_paused.cancel()
            self._accept_paused = None
        if self.listening:
            self.listening = False
            sock = self._listen_sock
            self._listen_sock = None
            if sock is not None:
                watch_reads(self.loop, self._direct, sock.fileno(), None)
                sock.close()
            if self.socket_path is not None and unlink:
                try:
                    os.unlink(self.socket_path)
                except OSError:
                    pass
            self.registry.listening_changed(self)
        self._maybe_finished()

    def stop(self, reason: str | None = "server stopped") -> None:
        """Stop listening and disconnect every confined connection (each logged with
        ``reason``, unless None)."""
        for session in list(self.sessions):
            session.close(reason)
        self.stop_listening()

    def _maybe_finished(self) -> None:
        if not (self.listening or self.sessions or self.adopted or self._finished):
            self._finished = True
            self._handshakes.close()
            self.partials.close()
            if self.anchor is not None:
                self.spares.forget(self.anchor)
                self.anchor.close()
            self.registry.server_finished(self)

    @property
    def finished(self) -> bool:
        """True once the server was removed."""
        return self._finished

    # -- callbacks from sessions -----------------------------------------------------------

    def make_filter(self, session: ServerSession) -> MessageFilter:
        """The filter for a new session, following the current settings."""
        if self.spec.filter.enabled and self._filter_factory is not None:
            return self._filter_factory(session, self.spec.filter)
        return BasicFilter(self.service_names, self._basic_passes)

    def set_filter(self, settings: FilterSettings) -> None:
        """SetPolicy: new filter settings for future and live connections, at once."""
        self.spec.filter = settings
        for session in list(self.sessions):
            if settings.enabled and session.update_policy(settings.policy):
                continue
            session.replace_filter(self.make_filter(session))

    def handshake_started(self, session: ServerSession) -> None:
        """A new session's auth timeout starts now."""
        self._handshakes.add(session)

    def handshake_done(self, session: ServerSession) -> None:
        """The session's Hello went to the bus: no auth timeout any more."""
        self._handshakes.discard(session)

    def session_named(self, session: ServerSession) -> None:
        """A session learned its unique name."""
        self.registry.session_named(session)

    def adopted_left(self, unique_name: str) -> None:
        """A connection of the previous service process ended."""
        if self.adopted.pop(unique_name, None) is not None:
            self._maybe_finished()

    def session_closed(self, session: ServerSession) -> None:
        """A session ended."""
        self.sessions.discard(session)
        self._handshakes.discard(session)
        self.partials.discard(session)
        self.registry.session_closed(session)
        self._maybe_finished()

    def count_denied(self) -> None:
        """One more message denied or dropped."""
        self.messages_denied += 1

    def log_denial(
        self, session: ServerSession, direction: str, hdr: Header, verdict: str, reason: str
    ) -> None:
        """Log a denial at info level, rate-limited so a client cannot flood the journal."""
        self._denials.log(session.unique_name, direction, hdr, verdict, reason)
