"""The per-server objects: org.freedesktop.DBus.Containers1.Server at each server's path."""

from __future__ import annotations

import os
from typing import Any

from dbus_fast import Variant
from dbus_fast.service import ServiceInterface

from xdg_containers.compat.dbusfast import dbus_method, dbus_property
from xdg_containers.io.peercred import PeerCredentials
from xdg_containers.servers.arguments import ArgumentError, parse_policy_arguments
from xdg_containers.servers.server import ContainerServer
from xdg_containers.servers.spec import FilterSettings
from xdg_containers.service import errors
from xdg_containers.service.authorization import check_may_stop
from xdg_containers.service.context import (
    PATH_KEY,
    SERVER_INTERFACE,
    ServiceContext,
    current_message,
)


def server_info_tuple(server: ContainerServer) -> list[Any]:
    """(creator, container_type, app_id, instance_id, metadata) of a server."""
    s = server.spec
    return [s.creator, s.container_type, s.app_id, s.instance_id, s.metadata]


def add_server_results(server: ContainerServer) -> dict[str, Variant]:
    """AddServer's second return value: the address and path of a minted socket."""
    results: dict[str, Variant] = {}
    if server.socket_path is not None:
        results["Address"] = Variant("s", server.address)
        results["SocketPath"] = Variant("ay", os.fsencode(server.socket_path) + b"\0")
    return results


def credentials_dict(creds: PeerCredentials, server: ContainerServer) -> dict[str, Variant]:
    """GetConnectionCredentials' answer without the pidfd."""
    out: dict[str, Variant] = {
        "UnixUserID": Variant("u", creds.uid),
        "UnixGroupIDs": Variant("au", list(creds.groups) or [creds.gid]),
        "ProcessID": Variant("u", creds.pid),
        PATH_KEY: Variant("o", server.path),
    }
    if creds.security_label is not None:
        out["LinuxSecurityLabel"] = Variant("ay", creds.security_label)
    return out


class ServerObject(ServiceInterface):
    """org.freedesktop.DBus.Containers1.Server at a server's path.

    Counters change on every message (EmitsChangedSignal false, so caching proxies
    re-read them); what AddServer fixed never changes (const).
    """

    def __init__(self, ctx: ServiceContext, server: ContainerServer) -> None:
        """Bind to one server."""
        super().__init__(SERVER_INTERFACE)
        self.ctx = ctx
        self.server = server

    @dbus_property("s", emits_changed="const")
    def ContainerType(self) -> str:
        """The container type given to AddServer."""
        return self.server.spec.container_type

    @dbus_property("s", emits_changed="const")
    def AppID(self) -> str:
        """The app id given to AddServer."""
        return self.server.spec.app_id

    @dbus_property("s", emits_changed="const")
    def InstanceID(self) -> str:
        """The instance id given to AddServer."""
        return self.server.spec.instance_id

    @dbus_property("a{sv}", emits_changed="const")
    def Metadata(self) -> dict[str, Variant]:
        """The metadata given to AddServer."""
        return self.server.spec.metadata

    @dbus_property("a{sv}", emits_changed="const")
    def Creator(self) -> dict[str, Variant]:
        """The AddServer caller's credentials, as the bus reported them."""
        return self.server.spec.creator

    @dbus_property("s", emits_changed="const")
    def Address(self) -> str:
        """The minted socket's address ('' for a launcher-provided socket)."""
        return self.server.address

    @dbus_property("ay", emits_changed="const")
    def SocketPath(self) -> bytes:
        """The minted socket's path with a trailing NUL (empty for ListenFD)."""
        p = self.server.socket_path
        return os.fsencode(p) + b"\0" if p else b""

    @dbus_property("b")
    def Listening(self) -> bool:
        """Whether the server still accepts connections."""
        return self.server.listening

    @dbus_property("as")
    def Connections(self) -> list[str]:
        """Unique names of the live confined connections."""
        return self.server.connection_names()

    @dbus_property("t", emits_changed="false")
    def MessagesForwarded(self) -> int:
        """Messages that crossed the proxy."""
        return self.server.messages_forwarded

    @dbus_property("t", emits_changed="false")
    def MessagesDenied(self) -> int:
        """Messages denied or dropped by the filter."""
        return self.server.messages_denied

    @dbus_method()
    async def Stop(self) -> None:
        """Same as the manager's StopServer for this server."""
        msg = current_message()
        server = await check_may_stop(self.ctx, msg.sender, self.server.path)
        self.ctx.stop_server(server)

    @dbus_method()
    async def StopListening(self) -> None:
        """Same as the manager's StopListening for this server."""
        msg = current_message()
        server = await check_may_stop(self.ctx, msg.sender, self.server.path)
        server.stop_listening()

    @dbus_method("a{sv}")
    async def SetPolicy(self, named_arguments: dict[str, Variant]) -> None:
        """Replace Filter/Policy/Call/Broadcast for live and future connections."""
        msg = current_message()
        server = await check_may_stop(self.ctx, msg.sender, self.server.path)
        try:
            enabled, policy = parse_policy_arguments(named_arguments)
        except ArgumentError as exc:
            raise errors.invalid_args(str(exc)) from exc
        server.set_filter(FilterSettings(enabled, policy))
        server.spec.policy_arguments = dict(named_arguments)
        self.ctx.persistence.save(server)


def export_server_object(ctx: ServiceContext, server: ContainerServer) -> ServerObject:
    """Create and export the object for a new server."""
    obj = ServerObject(ctx, server)
    ctx.server_objects[server.path] = obj
    ctx.bus.export(server.path, obj)
    return obj
