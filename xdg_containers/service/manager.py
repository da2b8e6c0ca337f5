"""The manager: org.freedesktop.DBus.Containers1 at /org/freedesktop/DBus/Containers1."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from dbus_fast import DBusError, Message, Variant
from dbus_fast.service import ServiceInterface

from xdg_containers.compat.dbusfast import dbus_method, dbus_property, dbus_signal
from xdg_containers.io.anchor_link import AnchorLink
from xdg_containers.servers.arguments import (
    CONNECTOR,
    FD_ARGUMENTS,
    POLICY_ARGUMENTS,
    SUPPORTED_ARGUMENTS,
    ArgumentError,
    parse_named_arguments,
)
from xdg_containers.servers.registry import LimitError
from xdg_containers.servers.server import ContainerServer
from xdg_containers.servers.spec import FilterSettings, ServerSpec
from xdg_containers.service import errors
from xdg_containers.service.authorization import (
    check_may_stop,
    check_not_confined,
    resolve_session,
    server_by_path,
)
from xdg_containers.service.checks import (
    attached_fd,
    check_connector,
    check_listen_fd,
    metadata_size,
    upstream_address,
)
from xdg_containers.service.context import INTERFACE, ServiceContext, current_message
from xdg_containers.service.objects import (
    add_server_results,
    credentials_dict,
    export_server_object,
    server_info_tuple,
)
from xdg_containers.service.reregister import reregister, server_on
from xdg_containers.service.zygote import AnchorStartError
from xdg_containers.wire.address import same_bus
from xdg_containers.wire.names import is_valid_interface_name

log = logging.getLogger(__name__)


class ManagerInterface(ServiceInterface):
    """org.freedesktop.DBus.Containers1 at /org/freedesktop/DBus/Containers1."""

    def __init__(self, ctx: ServiceContext) -> None:
        """Bind to the shared service state."""
        super().__init__(INTERFACE)
        self.ctx = ctx

    @dbus_method("sssa{sv}a{sv}", "oa{sv}")
    async def AddServer(
        self,
        container_type: str,
        app_id: str,
        instance_id: str,
        metadata: dict[str, Variant],
        named_arguments: dict[str, Variant],
    ) -> list[Any]:
        """Create a server for one app instance; return its path and address."""
        msg = current_message()
        # Take our own copies of the fds now, before any await: dbus-fast
        # closes nothing and the pre-dispatch handler closes the originals.
        # Handles are read from the message as it arrived (indices into its
        # fds), not from ``named_arguments``: see attached_fd.
        raw_named: dict[str, Variant] = msg.body[4]
        dup_fds: dict[str, int] = {}
        self.ctx.add_server_started()
        try:
            for key in FD_ARGUMENTS:
                var = raw_named.get(key)
                if var is not None and var.signature == "h":
                    dup_fds[key] = attached_fd(msg, var.value, key)
            return await self._add_server(
                msg, container_type, app_id, instance_id, metadata, named_arguments, dup_fds
            )
        finally:
            self.ctx.add_server_ended()
            for fd in dup_fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    async def _add_server(
        self,
        msg: Message,
        container_type: str,
        app_id: str,
        instance_id: str,
        metadata: dict[str, Variant],
        named_arguments: dict[str, Variant],
        dup_fds: dict[str, int],
    ) -> list[Any]:
        ctx = self.ctx
        sender = msg.sender
        check_not_confined(ctx, sender, "AddServer")
        if not is_valid_interface_name(container_type):
            raise errors.invalid_args(
                f"container type {container_type!r} is not a valid interface-like name "
                "(e.g. org.flatpak)"
            )
        size = metadata_size(container_type, app_id, instance_id, metadata)
        if size > ctx.registry.limits.max_metadata_bytes:
            raise errors.limits_exceeded(
                f"metadata of {size} bytes exceeds max_metadata_bytes="
                f"{ctx.registry.limits.max_metadata_bytes}"
            )
        # Every well-typed handle is now one of our dups (attached_fd).
        args = dict(named_arguments)
        for key, fd in dup_fds.items():
            args[key] = Variant("h", fd)
        try:
            parsed = parse_named_arguments(args)
        except ArgumentError as exc:
            raise errors.invalid_args(str(exc)) from exc
        if parsed.connector is not None:
            check_connector(parsed.connector)
        bus_address = await upstream_address(parsed.bus, ctx.bus_address)
        listen_sock: socket.socket | None = None
        if parsed.listen_fd is not None:
            listen_sock = check_listen_fd(parsed.listen_fd)
        try:
            assert sender is not None
            try:
                creds_reply = await ctx.bus_call("GetConnectionCredentials", "s", [sender])
            except DBusError as exc:
                raise errors.failed(f"cannot read the caller's credentials: {exc.text}") from exc
            creator: dict[str, Variant] = dict(creds_reply.body[0])
            uid_var = creator.get("UnixUserID")
            if uid_var is None:
                raise errors.failed("the bus did not report the caller's uid")
            uid = int(uid_var.value)
            if uid != os.getuid():
                # A server proxies with our credentials: only our own uid may have one.
                raise errors.access_denied(
                    f"uid {uid} may not create servers: this service runs as uid "
                    f"{os.getuid()} and would proxy with its credentials"
                )
            if listen_sock is not None:
                served = server_on(ctx, listen_sock)
                if served is not None:
                    answer = reregister(ctx, served, (container_type, app_id, instance_id),
                                        dup_fds, sender, creator)
                    ctx.persistence.save(served)  # its new Connector kept for a restart
                    return answer
            try:
                ctx.registry.check_can_add(uid)
            except LimitError as exc:
                raise errors.limits_exceeded(str(exc)) from exc
            spec = ServerSpec(
                container_type=container_type,
                app_id=app_id,
                instance_id=instance_id,
                metadata=metadata,
                creator=creator,
                creator_uid=uid,
                creator_name=sender,
                bus_address=bus_address,
                stop_on_disconnect=parsed.stop_on_disconnect,
                log_messages=parsed.log,
                filter=FilterSettings(parsed.filter, parsed.policy),
                on_service_bus=same_bus(bus_address, ctx.bus_address),
                policy_arguments={
                    k: v for k, v in named_arguments.items() if k in POLICY_ARGUMENTS
                },
                connector=parsed.connector is not None,
                stop_on_notify=parsed.stop_on_notify is not None,
            )
            if parsed.connector is not None:
                anchor = AnchorLink(
                    asyncio.get_running_loop(), socket.socket(fileno=dup_fds.pop(CONNECTOR))
                )
            else:
                try:
                    anchor = await ctx.anchors.start_anchor(container_type, app_id, instance_id)
                except AnchorStartError as exc:
                    log.error("AddServer from %s: cannot start an anchor: %s", sender, exc)
                    raise errors.failed(f"cannot start the server's anchor: {exc}") from exc
            server = ContainerServer(
                spec,
                ctx.registry.allocate_path(),
                ctx.registry,
                ctx.service_names if spec.on_service_bus else ctx.well_known_name_only,
                ctx.filter_factory,
            )
            server.attach_anchor(anchor)
            if listen_sock is not None:
                server.listen_on(listen_sock)
                listen_sock = None
            else:
                try:
                    server.listen_new()
                except OSError as exc:
                    anchor.close()
                    log.error("cannot create a socket: %s", exc)
                    raise errors.failed(f"cannot create a listening socket: {exc}") from exc
        finally:
            if listen_sock is not None:
                listen_sock.close()
        ctx.registry.add(server)
        export_server_object(ctx, server)
        if parsed.stop_on_notify is not None:
            server.watch_notify_fd(dup_fds.pop("StopOnNotify"))
        log.info(
            "%s: new server for %s %r instance %r, creator %s (uid %d)%s%s",
            server.path,
            container_type,
            app_id,
            instance_id,
            sender,
            uid,
            ", filtered" if parsed.filter else "",
            f", socket {server.socket_path}" if server.socket_path else ", caller's socket",
        )
        if parsed.stop_on_disconnect and ctx.tracker.is_gone(sender):
            server.stop_listening()
        ctx.persistence.save(server)
        return [server.path, add_server_results(server)]

    @dbus_method("o")
    async def StopServer(self, server_path: str) -> None:
        """Stop listening and disconnect every connection of the server."""
        msg = current_message()
        server = await check_may_stop(self.ctx, msg.sender, server_path)
        self.ctx.stop_server(server)

    @dbus_method("o")
    async def StopListening(self, server_path: str) -> None:
        """Stop listening; existing connections carry on."""
        msg = current_message()
        server = await check_may_stop(self.ctx, msg.sender, server_path)
        server.stop_listening()

    @dbus_method("s", "oa{sv}sssa{sv}")
    async def GetConnectionInfo(self, bus_name: str) -> list[Any]:
        """Which server (and so which app instance) a connection came through."""
        msg = current_message()
        session = await resolve_session(self.ctx, bus_name, msg.sender)
        return [session.server.path, *server_info_tuple(session.server)]

    @dbus_method("o", "a{sv}sssa{sv}")
    def GetServerInfo(self, server_path: str) -> list[Any]:
        """Metadata of a live server."""
        msg = current_message()
        return server_info_tuple(server_by_path(self.ctx, server_path, msg.sender))

    @dbus_method("s", "a{sv}")
    async def GetConnectionCredentials(self, bus_name: str) -> dict[str, Variant]:
        """The real client behind a proxied connection, as our socket saw it.

        Calls are answered by ``answer_connection_credentials`` from the
        pre-dispatch hook, which can attach the pidfd; this declaration gives
        the method its place in introspection and serves callers that reach
        it any other way, without the fd.
        """
        msg = current_message()
        session = await resolve_session(self.ctx, bus_name, msg.sender)
        return credentials_dict(session.creds, session.server)

    @dbus_method("", "ao")
    def ListServers(self) -> list[str]:
        """Every live server (a confined caller sees only its own)."""
        msg = current_message()
        own = self.ctx.registry.session_for(msg.sender) if msg.sender else None
        if own is not None:
            return [own.server.path] if not own.server.finished else []
        return [s.path for s in self.ctx.registry]

    @dbus_property("as")
    def SupportedArguments(self) -> list[str]:
        """Every named argument AddServer accepts."""
        return list(SUPPORTED_ARGUMENTS)

    @dbus_signal("o")
    def ServerRemoved(self, server_path: str) -> str:
        """A server stopped listening and lost its last connection."""
        return server_path


