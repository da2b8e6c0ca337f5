"""Composition root of ``xdg-containers serve``: bus connection, name, objects, shutdown."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import signal
from collections.abc import Callable
from typing import Any

from dbus_fast import BusType, DBusError, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.constants import NameFlag
from dbus_fast.service import ServiceInterface

from xdg_containers.compat.dbusfast import connect_bus, limitations
from xdg_containers.config import Limits
from xdg_containers.io.ownerfeed import FeedError, OwnerChangeFeed
from xdg_containers.io.session import MessageFilter, Session
from xdg_containers.io.spare import spares_for
from xdg_containers.policy.tracker import NameTracker
from xdg_containers.servers.filtering import PolicyFilterFactory
from xdg_containers.servers.registry import ServerRegistry
from xdg_containers.servers.server import ContainerServer
from xdg_containers.servers.spec import FilterSettings
from xdg_containers.servers.stale import remove_stale_sockets
from xdg_containers.service import (
    NAME,
    PATH,
    ManagerInterface,
    ServiceContext,
    install_dispatch_hooks,
)
from xdg_containers.service.fdstore import open_fd_store
from xdg_containers.service.fdsystemd import sd_notify
from xdg_containers.service.handover import (
    HandoverError,
    HandoverSource,
    adopt_message,
    take_over,
)
from xdg_containers.service.persistence import Persistence, store_for_bus
from xdg_containers.service.restore import Kept, kept_from_store, restore_from_disk
from xdg_containers.wire.address import session_bus_address, system_bus_address

log = logging.getLogger(__name__)

EXIT_NAME_TAKEN = 3
#: Connections changes are signalled at most this often per server (connection storms
#: from a launching app cost one signal per window, not two per connection).
CONNECTIONS_SIGNAL_DELAY = 0.02
EXIT_BUS_LOST = 4
#: What ``serve`` returns once it handed over and drained (the process exits 0); the
#: caller may still hold something the new service needs (``serve --private``'s bus).
HANDED_OVER = -1


class ServiceError(Exception):
    """The service cannot start or keep running; the message says why."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        """``exit_code`` is what the process should exit with."""
        super().__init__(message)
        self.exit_code = exit_code


class Service:
    """A running Containers1 service on one bus."""

    def __init__(
        self,
        bus_address: str | None,
        bus_type: BusType,
        limits: Limits,
        filter_factory: Callable[[Session, FilterSettings], MessageFilter] | None = None,
        replace: bool = False,
    ) -> None:
        """Configure; ``start()`` connects. ``replace``: take over from a running service."""
        self.replace = replace
        #: set once this process handed its servers to a new one; it then drains
        self.handed_over = False
        self.drained = asyncio.Event()
        self.bus_address = bus_address
        self.bus_type = bus_type
        self.limits = limits
        self.registry = ServerRegistry(limits)
        self.tracker = NameTracker()
        self.filter_factory = filter_factory or PolicyFilterFactory(self.tracker)
        self.bus: MessageBus | None = None
        self.ctx: ServiceContext | None = None
        self.manager: ManagerInterface | None = None
        self._dirty_connections: dict[str, ContainerServer] = {}
        self._signalled_connections: dict[str, list[str]] = {}  # path -> last signalled
        self.feed: OwnerChangeFeed | None = None
        self._feed_gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        """Connect, export the manager, subscribe to owner changes, claim the name."""
        address = self.bus_address or default_bus_address(self.bus_type)
        try:
            bus = await connect_bus(address, negotiate_unix_fd=True)
        except Exception as exc:
            where = self.bus_address or f"the {self.bus_type.name.lower()} bus ({address})"
            raise ServiceError(
                f"cannot connect to {where}: {exc or type(exc).__name__} (is the bus running, "
                "and is the address right? --address ADDR picks another bus)"
            ) from exc
        self.bus = bus
        ctx = ServiceContext(bus, self.registry, address, self.tracker, self.filter_factory)
        self.ctx = ctx
        manager = ManagerInterface(ctx)
        self.manager = manager
        install_dispatch_hooks(ctx, manager)
        self.source = HandoverSource(ctx, self._handed_over)
        bus.add_message_handler(self.source.handle)
        bus.add_message_handler(functools.partial(adopt_message, ctx))
        bus.export(PATH, manager)
        self.registry.on_removed.append(self._server_removed)
        self.registry.on_connections_changed.append(self._connections_changed)
        self.registry.on_listening_changed.append(self._listening_changed)
        self.tracker.on_unique_gone.append(self.registry.unique_name_gone)
        await self._open_store(ctx, address)
        # Owner changes come on a connection of their own (io/ownerfeed.py); subscribed
        # (the bus answered the AddMatch) before the current owners are listed, so
        # no change falls between the two.
        feed = OwnerChangeFeed(self.tracker, self._feed_lost)
        try:
            await feed.start(address)
        except FeedError as exc:
            bus.disconnect()
            raise ServiceError(
                f"cannot subscribe to name owner changes on {address}: {exc} (the filter "
                "needs them; does the bus accept a second connection from this user?)"
            ) from exc
        self.feed = feed
        await self._sync_names(ctx)
        running = self.tracker.owner_of(NAME)
        if self.replace and running:
            await self._take_over(ctx, running)
            log.info("serving %s on %s as %s", NAME, address, bus.unique_name)
            return
        # Servers of a run that crashed come back before the name is taken, so that the
        # call that activated us finds them; never while another service owns the name.
        if not running:
            await self._restore(ctx)
        remove_stale_sockets()
        reply = await bus.request_name(NAME, NameFlag.DO_NOT_QUEUE | NameFlag.ALLOW_REPLACEMENT)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            ctx.persistence = Persistence(None)  # the records are the name owner's
            self.shutdown()
            raise ServiceError(
                f"the name {NAME} is already owned on this bus: another xdg-containers "
                "(or a dbus-daemon with Containers1) serves it; use that one, or stop it "
                "first ('xdg-containers list' talks to whichever runs)",
                EXIT_NAME_TAKEN,
            )
        log.info("serving %s on %s as %s", NAME, address, bus.unique_name)
        for limitation in limitations():
            log.warning("%s", limitation)

    async def _take_over(self, ctx: ServiceContext, running: str) -> None:
        """serve --replace: the name first (calls to us wait), then the servers of
        ``running``, which keeps forwarding its live connections."""
        assert self.bus is not None
        ctx.ready.clear()
        try:
            flags = NameFlag.REPLACE_EXISTING | NameFlag.ALLOW_REPLACEMENT | NameFlag.DO_NOT_QUEUE
            reply = await self.bus.request_name(NAME, flags)
            if reply != RequestNameReply.PRIMARY_OWNER:
                ctx.persistence = Persistence(None)
                self.shutdown()
                raise ServiceError(
                    f"the running service ({running}) does not allow {NAME} to be taken over "
                    "(started by a version without serve --replace?); stop it first",
                    EXIT_NAME_TAKEN,
                )
            ctx.predecessor = running
            try:
                count = await take_over(ctx, running)
            except (HandoverError, DBusError) as exc:
                log.error("took the name, but not the servers of %s: %s", running, exc)
                return
            log.info("took over %d server(s) from %s", count, running)
            # Under systemd (NotifyAccess=all) this process is the unit's main one now:
            # the old one will exit, and the unit must not end with it.
            sd_notify(f"MAINPID={os.getpid()}")
        finally:
            ctx.ready.set()

    async def wait_drained(self) -> None:
        """Until this process handed its servers over, the new one has their fds, and
        the last connection it still forwarded has closed."""
        await self.drained.wait()
        await self.source.fds_fetched()

    def _handed_over(self) -> None:
        """This process gave its servers away: it drains, and exits once they are gone."""
        self.handed_over = True
        self._maybe_drained()

    def _maybe_drained(self) -> None:
        if self.handed_over and not len(self.registry):
            self.drained.set()

    async def _sync_names(self, ctx: ServiceContext) -> None:
        """Learn the current owner of every well-known name (the tracker's start state)."""
        reply = await ctx.bus_call("ListNames", "", [])
        for name in reply.body[0]:
            if name.startswith(":") or name == "org.freedesktop.DBus":
                continue
            try:
                owner = await ctx.bus_call("GetNameOwner", "s", [name])
            except Exception:
                continue  # released meanwhile
            self.tracker.learn_owner(name, str(owner.body[0]))

    def _feed_lost(self, reason: str) -> None:
        log.error(
            "the connection watching name owners was lost (%s); stopping, since filtering "
            "needs it (the next call to the name restarts the service when it is activatable)",
            reason,
        )
        if not self._feed_gone.done():
            self._feed_gone.set_result(reason)

    async def _open_store(self, ctx: ServiceContext, address: str) -> None:
        """Keep the registry on disk, in a directory of this bus's own (by its id), and
        the servers' sockets in a fd store of that bus's (systemd's, or a keeper)."""
        try:
            reply = await ctx.bus_call("GetId", "", [])
            bus_id = str(reply.body[0])
            store = store_for_bus(bus_id)
        except (OSError, ValueError, DBusError) as exc:
            log.warning("servers will not be kept for a restart: %s", exc)
            return
        ctx.persistence = Persistence(store, open_fd_store(bus_id, address))

    async def _restore(self, ctx: ServiceContext) -> None:
        """Bring back the servers of a run that crashed, with the fds the store kept."""
        fds = ctx.persistence.fds
        kept: dict[str, Kept] = {}
        if fds is not None:
            kept, stray = kept_from_store(fds.take_inherited())
            for name in stray:
                fds.remove(name)
        restored = await restore_from_disk(ctx, kept)
        if restored:
            log.info("brought back %d server(s) of an earlier run", restored)

    def _server_removed(self, server: ContainerServer) -> None:
        assert self.bus is not None and self.manager is not None and self.ctx is not None
        log.info("%s: removed", server.path)
        if self.handed_over:  # the new process announces it (once)
            self._maybe_drained()
        else:
            self.manager.ServerRemoved(server.path)
        self.ctx.server_objects.pop(server.path, None)
        self._signalled_connections.pop(server.path, None)
        self.bus.unexport(server.path)

    def _connections_changed(self, server: ContainerServer) -> None:
        if self.handed_over:
            self.source.session_named(server)
            return
        # Coalesced: at most one PropertiesChanged per server per CONNECTIONS_SIGNAL_DELAY,
        # however many connections came and went in it, and none when the list ends up
        # as last signalled (a connection that came and went in between).
        if not self._dirty_connections:
            asyncio.get_running_loop().call_later(
                CONNECTIONS_SIGNAL_DELAY, self._emit_connections
            )
        self._dirty_connections[server.path] = server

    def _emit_connections(self) -> None:
        dirty = self._dirty_connections
        self._dirty_connections = {}
        for path, server in dirty.items():
            obj = self._object(server)
            if obj is None:
                continue
            names = server.connection_names()
            if names == self._signalled_connections.get(path, []):
                continue
            self._signalled_connections[path] = names
            obj.emit_properties_changed({"Connections": names})

    def _listening_changed(self, server: ContainerServer) -> None:
        if self.handed_over:
            return
        if self.ctx is not None:
            self.ctx.persistence.forget(server)
        obj = self._object(server)
        if obj is not None:
            obj.emit_properties_changed({"Listening": server.listening})

    def _object(self, server: ContainerServer) -> ServiceInterface | None:
        if self.ctx is None or server.finished:
            return None
        return self.ctx.server_objects.get(server.path)

    def shutdown(self) -> None:
        """Stop every server (unlinking its socket) and leave the bus."""
        spares_for(asyncio.get_running_loop()).close()  # first: ending sessions make none
        for server in self.registry:
            server.stop()
        if self.ctx is not None:
            self.ctx.persistence.close()  # nothing is to come back from a stop
            self.ctx.anchors.close()
        if self.feed is not None:
            self.feed.close()
        if self.bus is not None and self.bus.connected:
            self.bus.disconnect()

    async def wait_for_disconnect(self) -> Any:
        """Return when the bus connection (or the owner-change feed's) ends."""
        assert self.bus is not None
        lost = asyncio.ensure_future(self.bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        try:
            await asyncio.wait({lost, self._feed_gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not lost.done():
                lost.cancel()
        return lost.result() if lost.done() and not lost.cancelled() else None


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (SPEC 12): every connection costs
    fds, and the 1024 soft default would run short long before the other limits do.
    (The service waits with epoll, never select(), so fds above 1023 are fine.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning(
                "cannot raise the fd limit from %d to %d: %s; fewer connections can be "
                "served (raise LimitNOFILE= or ulimit -n)",
                soft,
                hard,
                exc,
            )
    return soft


def default_bus_address(bus_type: BusType) -> str:
    """The address of the session or system bus, found as every D-Bus library does
    (ServiceError if no session bus address is known)."""
    if bus_type == BusType.SYSTEM:
        return system_bus_address()
    address = session_bus_address()
    if address is None:
        raise ServiceError(
            "no session bus: DBUS_SESSION_BUS_ADDRESS is unset and $XDG_RUNTIME_DIR/bus "
            "does not exist (use --address, --system or --private)"
        )
    return address


async def serve(
    bus_address: str | None,
    bus_type: BusType,
    limits: Limits,
    ready_fd: int | None = None,
    filter_factory: Callable[[Session, FilterSettings], MessageFilter] | None = None,
    replace: bool = False,
) -> int:
    """Run until SIGTERM/SIGINT (exit 0), until handed over and drained (exit 0) or until
    the bus goes away (non-zero)."""
    raise_fd_limit()
    service = Service(bus_address, bus_type, limits, filter_factory, replace)
    await service.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"READY=1\n")
            os.close(ready_fd)
        except OSError as exc:
            log.warning(
                "cannot write READY=1 to --ready-fd %d: %s; serving anyway, but whoever "
                "waits on that fd will not learn it",
                ready_fd,
                exc,
            )
    stop_task = asyncio.ensure_future(stop.wait())
    bus_task = asyncio.ensure_future(service.wait_for_disconnect())
    drained = asyncio.ensure_future(service.wait_drained())
    done, _pending = await asyncio.wait(
        {stop_task, bus_task, drained}, return_when=asyncio.FIRST_COMPLETED)
    for t in (stop_task, bus_task, drained):
        if t not in done:
            t.cancel()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    if drained in done:
        log.info("handed over, and the last connection forwarded by this process closed: "
                 "exiting")
        service.shutdown()
        return HANDED_OVER
    if stop_task in done:
        log.info("stopping on SIGTERM/SIGINT: closing every server and removing its socket")
        service.shutdown()
        return 0
    if not bus_task.cancelled() and bus_task.exception() is not None:
        log.debug("bus connection ended with %r", bus_task.exception())
    log.error(
        "the bus connection was lost; exiting with status %d after closing every server "
        "(the bus stopped or dropped us; the next call to the name restarts the service "
        "when it is activatable)",
        EXIT_BUS_LOST,
    )
    spares_for(loop).close()
    for server in service.registry:
        server.stop()
    return EXIT_BUS_LOST
