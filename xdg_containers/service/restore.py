"""Bring back the servers of an earlier run of the service (SPEC 13).

A server comes back from its record (servers/record.py) plus whatever survived of
its file descriptors: handed over by the running service (``serve --replace``), or
kept outside the process (a fd store). Without a kept listening socket, a socket the
service minted is bound again at the same path; a launcher's own socket (ListenFD)
cannot be, nor can a launcher's anchor or StopOnNotify fd: those servers wait for
their launcher to call AddServer again, and are not brought back here.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import select
import socket
import stat
from dataclasses import dataclass

from dbus_fast import DBusError

from xdg_containers.io.anchor_link import AnchorLink
from xdg_containers.servers.arguments import ArgumentError, parse_policy_arguments
from xdg_containers.servers.record import ServerRecord
from xdg_containers.servers.registry import SERVER_PATH_PREFIX, LimitError
from xdg_containers.servers.server import ContainerServer
from xdg_containers.servers.spec import FilterSettings, ServerSpec
from xdg_containers.servers.stale import is_minted, nobody_listens
from xdg_containers.service.context import ServiceContext
from xdg_containers.service.objects import export_server_object
from xdg_containers.service.zygote import AnchorStartError
from xdg_containers.wire.address import same_bus

log = logging.getLogger(__name__)

#: A name in the fd store (service/persistence.py): the server's cN and the fd's kind.
_KEPT_NAME = re.compile(r"c(0|[1-9][0-9]{0,17})\.(listen|connector|notify)")


class RestoreError(Exception):
    """This server cannot be brought back; the text says why."""


@dataclass
class Kept:
    """The fds of a server that survived its service (each owned by the Kept until used)."""

    listen: socket.socket | None = None
    connector: socket.socket | None = None
    notify_fd: int | None = None

    def close(self) -> None:
        """Close whatever was not used."""
        for sock in (self.listen, self.connector):
            if sock is not None:
                sock.close()
        if self.notify_fd is not None:
            os.close(self.notify_fd)
        self.listen = self.connector = self.notify_fd = None


def kept_from_store(inherited: dict[str, int]) -> tuple[dict[str, Kept], list[str]]:
    """What a fd store gave back, by server path, each fd checked for its kind; and the
    names that fit nothing (their fds closed: the caller removes them from the store)."""
    kept: dict[str, Kept] = {}
    stray: list[str] = []
    for name, fd in sorted(inherited.items()):
        match = _KEPT_NAME.fullmatch(name)
        if match is None:
            os.close(fd)
            stray.append(name)
            continue
        k = kept.setdefault(SERVER_PATH_PREFIX + match[1], Kept())
        kind = match[2]
        if kind == "notify":
            k.notify_fd = fd
            continue
        sock = socket.socket(fileno=fd)
        want = socket.SOCK_STREAM if kind == "listen" else socket.SOCK_SEQPACKET
        try:
            ok = sock.family == socket.AF_UNIX and sock.type == want and (
                kind != "listen" or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        except OSError:
            ok = False
        if not ok:
            log.warning("fd store: %s is not the socket its name says; ignored", name)
            sock.close()
            stray.append(name)
        elif kind == "listen":
            k.listen = sock
        else:
            k.connector = sock
    return kept, stray


def rebind(socket_path: str) -> socket.socket:
    """Listen again at a socket path this service minted (a record's: untrusted).

    Only ``$XDG_RUNTIME_DIR/dbus-1/containers/dbus-<16 hex>`` qualifies, and only
    when nobody listens there: a stale socket file is replaced, anything else
    (a live socket, a file that is not a socket) is left alone.
    """
    if not is_minted(socket_path):
        raise RestoreError(f"{socket_path!r} is not a socket this service mints")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.bind(socket_path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            _remove_stale(socket_path)
            sock.bind(socket_path)
        sock.listen(64)
    except (OSError, RestoreError) as exc:
        sock.close()
        if isinstance(exc, RestoreError):
            raise
        raise RestoreError(f"cannot listen at {socket_path} again: {exc.strerror}") from exc
    return sock


def _unlink_minted(socket_path: str) -> None:
    """Remove a socket this service minted (only such a path, only a socket)."""
    try:
        if is_minted(socket_path) and stat.S_ISSOCK(os.lstat(socket_path).st_mode):
            os.unlink(socket_path)
    except OSError:
        pass


def _remove_stale(socket_path: str) -> None:
    if not stat.S_ISSOCK(os.lstat(socket_path).st_mode):
        raise RestoreError(f"{socket_path} exists and is not a socket")
    if not nobody_listens(socket_path):
        raise RestoreError(f"something already listens at {socket_path}")
    os.unlink(socket_path)


def spec_of(record: ServerRecord, ctx: ServiceContext) -> ServerSpec:
    """The ServerSpec a record describes (its policy checked again, as SetPolicy would)."""
    try:
        enabled, policy = parse_policy_arguments(record.policy_arguments)
    except ArgumentError as exc:
        raise RestoreError(f"its policy is refused: {exc}") from None
    return ServerSpec(
        container_type=record.container_type,
        app_id=record.app_id,
        instance_id=record.instance_id,
        metadata=dict(record.metadata),
        creator=dict(record.creator),
        creator_uid=record.creator_uid,
        creator_name=record.creator_name,
        bus_address=record.bus_address,
        stop_on_disconnect=record.stop_on_disconnect,
        log_messages=record.log_messages,
        filter=FilterSettings(enabled, policy),
        on_service_bus=same_bus(record.bus_address, ctx.bus_address),
        policy_arguments=dict(record.policy_arguments),
        connector=record.connector,
        stop_on_notify=record.stop_on_notify,
    )


async def restore_server(
    ctx: ServiceContext, record: ServerRecord, kept: Kept, listening: bool = True
) -> ContainerServer:
    """Bring one server back, exported and recorded; RestoreError if it cannot.

    ``kept`` is consumed (what is not used is closed). ``listening`` False: a
    server that only has connections left (handed over; they are adopted next).
    """
    try:
        if not listening:
            anchor = await _anchor(ctx, record, kept)
            return _install(ctx, record, spec_of(record, ctx), None, anchor)
        return await _restore(ctx, record, kept)
    finally:
        kept.close()


async def _restore(ctx: ServiceContext, record: ServerRecord, kept: Kept) -> ContainerServer:
    if record.stop_on_notify and kept.notify_fd is None:
        raise RestoreError("its launcher's StopOnNotify fd did not survive; the launcher "
                           "must call AddServer again")
    if kept.listen is None and (record.socket_path is None or record.connector):
        raise RestoreError("its listening socket and anchor were its launcher's and did not "
                           "survive; the launcher must call AddServer again")
    if record.stop_on_disconnect and not await _on_bus(ctx, record.creator_name):
        raise RestoreError(f"its creator {record.creator_name} has left the bus")
    if kept.listen is not None and record.socket_path is not None:
        bound = kept.listen.getsockname()
        if os.fsdecode(bound) != record.socket_path:
            raise RestoreError(f"the kept listening socket is bound at {bound!r}, not at "
                               f"{record.socket_path}")
    spec = spec_of(record, ctx)
    listen = kept.listen
    if listen is None:
        listen = rebind(str(record.socket_path))
        log.info("%s: its socket was not kept; bound again at %s", record.path,
                 record.socket_path)
    kept.listen = None
    try:
        anchor = await _anchor(ctx, record, kept)
    except BaseException:
        listen.close()
        raise
    server = _install(ctx, record, spec, listen, anchor)
    if kept.notify_fd is not None:
        server.watch_notify_fd(kept.notify_fd)
        kept.notify_fd = None
    ctx.persistence.save(server)
    return server


def _install(
    ctx: ServiceContext, record: ServerRecord, spec: ServerSpec,
    listen: socket.socket | None, anchor: AnchorLink,
) -> ContainerServer:
    """The server in the registry and on the bus, at the record's path, with its guid."""
    try:
        if record.creator_uid != os.getuid():
            raise RestoreError(f"its creator uid {record.creator_uid} is not ours")
        if ctx.registry.get(record.path) is not None:
            raise RestoreError("a live server already has its path")
        ctx.registry.check_can_add(spec.creator_uid)
    except (LimitError, RestoreError) as exc:
        anchor.close()
        if listen is not None:
            listen.close()
        raise RestoreError(str(exc)) from None
    server = ContainerServer(
        spec, record.path, ctx.registry,
        ctx.service_names if spec.on_service_bus else ctx.well_known_name_only,
        ctx.filter_factory,
    )
    server.guid = record.guid
    server.socket_path = record.socket_path
    server.attach_anchor(anchor)
    if listen is not None:
        server.listen_on(listen)
    ctx.registry.reserve(record.path)
    ctx.registry.add(server)
    export_server_object(ctx, server)
    return server


def anchor_gone(sock: socket.socket) -> bool:
    """Whether the anchor at the other end of a kept Connector is gone."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR) for _fd, ev in poller.poll(0))


async def _anchor(ctx: ServiceContext, record: ServerRecord, kept: Kept) -> AnchorLink:
    if kept.connector is not None:
        sock, kept.connector = kept.connector, None
        if not anchor_gone(sock):
            return AnchorLink(asyncio.get_running_loop(), sock)
        # Its anchor died with us (systemd stops a failed unit's whole cgroup).
        sock.close()
        if record.connector:
            raise RestoreError("its launcher's anchor is gone")
        log.info("%s: its anchor is gone; starting a new one", record.path)
    try:
        return await ctx.anchors.start_anchor(
            record.container_type, record.app_id, record.instance_id)
    except AnchorStartError as exc:
        raise RestoreError(f"cannot start its anchor: {exc}") from None


async def _on_bus(ctx: ServiceContext, unique_name: str) -> bool:
    try:
        reply = await ctx.bus_call("NameHasOwner", "s", [unique_name])
    except DBusError:
        return False
    return bool(reply.body[0])


async def restore_from_disk(ctx: ServiceContext, kept: dict[str, Kept] | None = None) -> int:
    """Bring back every server recorded by an earlier run that ended without stopping
    them (a crash); each one that cannot come back is logged and its record removed.
    ``kept``: fds that survived, by server path. Returns how many came back."""
    store = ctx.persistence.store
    kept = kept or {}
    if store is None:
        return 0
    records, problems = store.load()
    for problem in problems:
        log.warning("registry: %s", problem)
    restored = 0
    for record in records:
        try:
            server = await restore_server(ctx, record, kept.pop(record.path, Kept()))
        except (RestoreError, OSError) as exc:
            log.warning("%s (%s %r): not brought back: %s", record.path,
                        record.container_type, record.app_id, exc)
            ctx.persistence.drop(record.path)
            if record.socket_path is not None:
                # Ours, and the fd store may still hold it open (a probe would connect).
                _unlink_minted(record.socket_path)
            continue
        restored += 1
        log.info("%s: brought back for %s %r instance %r, %s", server.path,
                 record.container_type, record.app_id, record.instance_id,
                 f"socket {server.socket_path}" if server.socket_path else "caller's socket")
    for path, left in kept.items():
        left.close()  # no record: nothing to bring back
        ctx.persistence.drop(path)
    return restored
