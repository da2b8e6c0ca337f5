"""The org.freedesktop.DBus.Containers1 objects: the manager and one object per server.

Ordinary dbus-fast ServiceInterfaces. A message handler registered before
dispatch records the message being handled (so methods know their caller) and
turns a known method called with the wrong signature into InvalidArgs.
"""


import asyncio
import contextvars
import inspect
import logging
import os
import socket
from collections.abc import Callable
from typing import Annotated, Any

from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast._private.marshaller import Marshaller
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import (
    ServiceInterface,
    dbus_method,
    dbus_property,
    dbus_signal,
)

from . import errors
from .anchor.link import AnchorLink
from .anchor.zygote import AnchorFactory, AnchorStartError
from .policy.tracker import NameTracker
from .proxy.endpoint import close_fds
from .proxy.peercred import PeerCredentials
from .servers.arguments import (
    CONNECTOR,
    FD_ARGUMENTS,
    LISTEN_FD,
    SUPPORTED_ARGUMENTS,
    ArgumentError,
    parse_named_arguments,
    parse_policy_arguments,
)
from .servers.registry import SERVER_PATH_PREFIX, LimitError, ServerRegistry
from .servers.server import ContainerServer, FilterSettings, ServerSpec
from .servers.server import ServerSession as Session
from .wire.address import (
    AddressError,
    parse_address,
    probe_address,
    same_bus,
    session_bus_address,
    system_bus_address,
)
from .wire.names import is_valid_bus_name, is_valid_interface_name

log = logging.getLogger(__name__)

NAME = "org.freedesktop.DBus.Containers1"
PATH = "/org/freedesktop/DBus/Containers1"
INTERFACE = "org.freedesktop.DBus.Containers1"
SERVER_INTERFACE = "org.freedesktop.DBus.Containers1.Server"
PATH_KEY = "org.freedesktop.DBus.Containers1.Path"
BUS_DRIVER = "org.freedesktop.DBus"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
BUS_ARGUMENT = "org.freedesktop.XdgContainers1.Bus"
#: How long AddServer waits for an entry of a ``Bus`` address to accept a connection.
BUS_PROBE_TIMEOUT = 2.0

ASV = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
_current_message: contextvars.ContextVar[Message | None] = contextvars.ContextVar(
    "xdg_containers_current_message", default=None
)


def current_message() -> Message:
    """The method call being handled (set by the pre-dispatch handler)."""
    msg = _current_message.get()
    if msg is None:
        raise errors.failed("internal error: no current message")
    return msg


def _metadata_size(container_type: str, app_id: str, instance_id: str, md: dict[str, Any]) -> int:
    body = Marshaller("a{sv}", [md]).marshall()
    return len(body) + sum(len(s.encode()) for s in (container_type, app_id, instance_id))


def _path_is_ours(path: str) -> bool:
    return path.startswith(SERVER_PATH_PREFIX) and path[len(SERVER_PATH_PREFIX) :].isdigit()


class ServiceContext:
    """Shared state of the service objects: the bus connection, registry, bus address."""

    def __init__(
        self, bus: MessageBus, registry: ServerRegistry, bus_address: str,
        tracker: NameTracker,
        filter_factory: Callable[[Session, FilterSettings], Any] | None = None,
    ) -> None:
        """``bus_address`` is the address of the bus the service itself is on; ``tracker``
        knows which unique names have left it (and calls ``peer_left`` when one does)."""
        self.bus = bus
        self.registry = registry
        self.bus_address = bus_address
        self.tracker = tracker
        self.filter_factory = filter_factory
        #: Starts the anchors of servers created without a Connector (SPEC 10).
        self.anchors = AnchorFactory(asyncio.get_running_loop())
        tracker.on_unique_gone.append(self.peer_left)
        self.server_objects: dict[str, ServerObject] = {}
        self._fd_replies: dict[int, Message] = {}

    def service_names(self) -> frozenset[str]:
        """Our well-known and unique names."""
        names = {NAME}
        if self.bus.unique_name:
            names.add(self.bus.unique_name)
        return frozenset(names)

    @staticmethod
    def well_known_name_only() -> frozenset[str]:
        """Our names as seen from another bus: our unique name there is someone else's."""
        return frozenset({NAME})

    async def bus_call(self, member: str, signature: str, body: list[Any]) -> Message:
        """Call a bus-driver method; the reply Message (errors raise DBusError)."""
        reply = await self.bus.call(
            Message(
                destination=BUS_DRIVER,
                path="/org/freedesktop/DBus",
                interface=BUS_DRIVER,
                member=member,
                signature=signature,
                body=body,
            )
        )
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            text = str(reply.body[0]) if reply.body else ""
            raise DBusError(reply.error_name or errors.FAILED, text)
        return reply

    async def caller_uid(self, sender: str) -> int:
        """The uid the bus reports for a peer."""
        reply = await self.bus_call("GetConnectionUnixUser", "s", [sender])
        return int(reply.body[0])

    def peer_left(self, name: str) -> None:
        """A unique name left the bus: stop listening on the servers tied to it."""
        for server in self.registry.servers_created_by(name):
            if server.spec.stop_on_disconnect and server.listening:
                log.info("%s: creator %s left the bus; stopping listening", server.path, name)
                server.stop_listening()

    async def resolve_session(self, bus_name: str, caller: str | None = None) -> Session:
        """The confined connection behind a bus name, with the SPEC's errors.

        A confined ``caller`` may only ask about itself: anything else is
        AccessDenied before any lookup, so the answer reveals nothing.
        """
        own = self.registry.session_for(caller) if caller else None
        if own is not None:
            if bus_name == caller:
                return own
            if bus_name.startswith(":") or await self._owner_or_none(bus_name) != caller:
                raise errors.access_denied(
                    "a confined connection may only ask about its own connection"
                )
            return own
        if bus_name == BUS_DRIVER:
            raise errors.not_container(f"{bus_name} is the message bus itself, not a container")
        if not is_valid_bus_name(bus_name):
            raise errors.name_has_no_owner(bus_name)
        if bus_name.startswith(":"):
            session = self.registry.session_for(bus_name)
            if session is not None:
                return session
            owner = await self._owner(bus_name)
        else:
            owner = await self._owner(bus_name)
            session = self.registry.session_for(owner)
            if session is not None:
                return session
        raise errors.not_container(f"{bus_name!r} (owned by {owner}) is not in a container")

    async def _owner_or_none(self, bus_name: str) -> str | None:
        try:
            return await self._owner(bus_name)
        except DBusError:
            return None

    async def _owner(self, bus_name: str) -> str:
        try:
            reply = await self.bus_call("GetNameOwner", "s", [bus_name])
        except DBusError as exc:
            raise errors.name_has_no_owner(bus_name) from exc
        return str(reply.body[0])

    def check_not_confined(self, sender: str | None, what: str) -> None:
        """AccessDenied for calls that confined connections may not make (no nesting)."""
        if self.registry.is_confined(sender):
            raise errors.access_denied(f"{what} cannot be called from inside a container")

    async def check_may_stop(self, sender: str | None, server_path: str) -> ContainerServer:
        """The server at ``server_path`` if ``sender`` may stop it."""
        self.check_not_confined(sender, "stopping a server")
        server = self.registry.get(server_path)
        if server is None:
            raise errors.not_container(f"{server_path} is not a live container server")
        assert sender is not None
        uid = await self.caller_uid(sender)
        if uid != server.creator_uid:
            raise errors.access_denied(
                f"uid {uid} may not stop {server_path}, created by uid {server.creator_uid}"
            )
        return server

    def server_by_path(self, path: str, caller: str | None) -> ContainerServer:
        """The live server at ``path``; a confined caller may only see its own."""
        own = self.registry.session_for(caller) if caller else None
        if own is not None and own.server.path != path:
            raise errors.access_denied("a confined connection may only ask about its own server")
        server = self.registry.get(path)
        if server is None:
            raise errors.not_container(f"{path} is not a live container server")
        return server

    # -- fd replies that a caller may not accept --------------------------------------

    def send_reply_with_fds(self, call: Message, reply: Message, fallback: Message) -> None:
        """Send ``reply``; if the bus refuses its fds, send ``fallback`` instead."""
        reply.serial = self.bus.next_serial()
        self._fd_replies[reply.serial] = fallback
        self.bus.send(reply)
        asyncio.get_running_loop().call_later(30.0, self._fd_replies.pop, reply.serial, None)

    def handle_fd_refusal(self, msg: Message) -> bool:
        """An error answering one of our fd-carrying replies: resend without the fd."""
        if msg.message_type != MessageType.ERROR or msg.reply_serial not in self._fd_replies:
            return False
        fallback = self._fd_replies.pop(msg.reply_serial)
        log.debug("caller refused fds (%s); resending reply without them", msg.error_name)
        self.bus.send(fallback)
        return True


def server_info_tuple(server: ContainerServer) -> list[Any]:
    """(creator, container_type, app_id, instance_id, metadata) of a server."""
    s = server.spec
    return [s.creator, s.container_type, s.app_id, s.instance_id, s.metadata]


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


class ManagerInterface(ServiceInterface):
    """org.freedesktop.DBus.Containers1 at /org/freedesktop/DBus/Containers1."""

    def __init__(self, ctx: ServiceContext) -> None:
        """Bind to the shared service state."""
        super().__init__(INTERFACE)
        self.ctx = ctx

    @dbus_method()
    async def AddServer(
        self,
        container_type: Annotated[str, DBusSignature("s")],
        app_id: Annotated[str, DBusSignature("s")],
        instance_id: Annotated[str, DBusSignature("s")],
        metadata: ASV,
        named_arguments: ASV,
    ) -> Annotated[tuple[str, dict[str, Variant]], DBusSignature("oa{sv}")]:
        """Create a server for one app instance; return its path and address."""
        msg = current_message()
        # Take our own copies of the fds now, before any await: dbus-fast
        # closes nothing and the pre-dispatch handler closes the originals.
        # Handles are read from the message as it arrived (indices into its
        # fds), not from ``named_arguments``: see attached_fd.
        raw_named: dict[str, Variant] = msg.body[4]
        dup_fds: dict[str, int] = {}
        try:
            for key in FD_ARGUMENTS:
                var = raw_named.get(key)
                if var is not None and var.signature == "h":
                    dup_fds[key] = attached_fd(msg, var.value, key)
            return await self._add_server(
                msg, container_type, app_id, instance_id, metadata, named_arguments, dup_fds
            )
        finally:
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
    ) -> tuple[str, dict[str, Variant]]:
        ctx = self.ctx
        sender = msg.sender
        ctx.check_not_confined(sender, "AddServer")
        if not is_valid_interface_name(container_type):
            raise errors.invalid_args(
                f"container type {container_type!r} is not a valid interface-like name "
                "(e.g. org.flatpak)"
            )
        size = _metadata_size(container_type, app_id, instance_id, metadata)
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
            _check_connector(parsed.connector)
        bus_address = await self._upstream_address(parsed.bus)
        listen_sock: socket.socket | None = None
        if parsed.listen_fd is not None:
            listen_sock = _check_listen_fd(parsed.listen_fd)
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
        ServerObject.export(ctx, server)
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
        results: dict[str, Variant] = {}
        if server.socket_path is not None:
            results["Address"] = Variant("s", server.address)
            results["SocketPath"] = Variant("ay", os.fsencode(server.socket_path) + b"\0")
        return server.path, results

    async def _upstream_address(self, bus: str) -> str:
        """The address a server's connections go to; one nobody listens on is refused
        here, not with a reset for every client later."""
        if bus == "":
            return self.ctx.bus_address
        if bus == "session":
            addr = session_bus_address()
            if addr is None:
                raise errors.invalid_args(f"{BUS_ARGUMENT}: no session bus address is known")
        elif bus == "system":
            addr = system_bus_address()
        else:
            addr = bus
        try:
            entries = parse_address(addr)
            for e in entries:
                e.sockaddr()
        except AddressError as exc:
            raise errors.invalid_args(
                f"{BUS_ARGUMENT}: {addr!r} is not a usable address: {exc}"
            ) from exc
        if not same_bus(addr, self.ctx.bus_address):
            problem = await probe_address(addr, BUS_PROBE_TIMEOUT)
            if problem is not None:
                raise errors.invalid_args(
                    f"{BUS_ARGUMENT}: nobody listens on {addr!r} ({problem})"
                )
        return addr

    @dbus_method()
    async def StopServer(self, server_path: Annotated[str, DBusSignature("o")]) -> None:
        """Stop listening and disconnect every connection of the server."""
        msg = current_message()
        server = await self.ctx.check_may_stop(msg.sender, server_path)
        server.stop()

    @dbus_method()
    async def StopListening(self, server_path: Annotated[str, DBusSignature("o")]) -> None:
        """Stop listening; existing connections carry on."""
        msg = current_message()
        server = await self.ctx.check_may_stop(msg.sender, server_path)
        server.stop_listening()

    @dbus_method()
    async def GetConnectionInfo(
        self, bus_name: Annotated[str, DBusSignature("s")]
    ) -> Annotated[list[Any], DBusSignature("oa{sv}sssa{sv}")]:
        """Which server (and so which app instance) a connection came through."""
        msg = current_message()
        session = await self.ctx.resolve_session(bus_name, msg.sender)
        return [session.server.path, *server_info_tuple(session.server)]

    @dbus_method()
    def GetServerInfo(
        self, server_path: Annotated[str, DBusSignature("o")]
    ) -> Annotated[list[Any], DBusSignature("a{sv}sssa{sv}")]:
        """Metadata of a live server."""
        msg = current_message()
        return server_info_tuple(self.ctx.server_by_path(server_path, msg.sender))

    @dbus_method()
    async def GetConnectionCredentials(
        self, bus_name: Annotated[str, DBusSignature("s")]
    ) -> Annotated[dict[str, Variant], DBusSignature("a{sv}")]:
        """The real client behind a proxied connection, as our socket saw it.

        Calls are answered by ``answer_connection_credentials`` from the
        pre-dispatch hook, which can attach the pidfd; this declaration gives
        the method its place in introspection and serves callers that reach
        it any other way, without the fd.
        """
        msg = current_message()
        session = await self.ctx.resolve_session(bus_name, msg.sender)
        return credentials_dict(session.creds, session.server)

    @dbus_method()
    def ListServers(self) -> Annotated[list[str], DBusSignature("ao")]:
        """Every live server (a confined caller sees only its own)."""
        msg = current_message()
        own = self.ctx.registry.session_for(msg.sender) if msg.sender else None
        if own is not None:
            return [own.server.path] if not own.server.finished else []
        return [s.path for s in self.ctx.registry]

    @dbus_property(access=PropertyAccess.READ)
    def SupportedArguments(self) -> Annotated[list[str], DBusSignature("as")]:
        """Every named argument AddServer accepts."""
        return list(SUPPORTED_ARGUMENTS)

    @dbus_signal()
    def ServerRemoved(
        self, server_path: str
    ) -> Annotated[str, DBusSignature("o")]:
        """A server stopped listening and lost its last connection."""
        return server_path


class ServerObject(ServiceInterface):
    """org.freedesktop.DBus.Containers1.Server at a server's path."""

    def __init__(self, ctx: ServiceContext, server: ContainerServer) -> None:
        """Bind to one server."""
        super().__init__(SERVER_INTERFACE)
        self.ctx = ctx
        self.server = server

    @classmethod
    def export(cls, ctx: ServiceContext, server: ContainerServer) -> "ServerObject":
        """Create and export the object for a new server."""
        obj = cls(ctx, server)
        ctx.server_objects[server.path] = obj
        ctx.bus.export(server.path, obj)
        return obj

    @dbus_property(access=PropertyAccess.READ)
    def ContainerType(self) -> Annotated[str, DBusSignature("s")]:
        """The container type given to AddServer."""
        return self.server.spec.container_type

    @dbus_property(access=PropertyAccess.READ)
    def AppID(self) -> Annotated[str, DBusSignature("s")]:
        """The app id given to AddServer."""
        return self.server.spec.app_id

    @dbus_property(access=PropertyAccess.READ)
    def InstanceID(self) -> Annotated[str, DBusSignature("s")]:
        """The instance id given to AddServer."""
        return self.server.spec.instance_id

    @dbus_property(access=PropertyAccess.READ)
    def Metadata(self) -> Annotated[dict[str, Variant], DBusSignature("a{sv}")]:
        """The metadata given to AddServer."""
        return self.server.spec.metadata

    @dbus_property(access=PropertyAccess.READ)
    def Creator(self) -> Annotated[dict[str, Variant], DBusSignature("a{sv}")]:
        """The AddServer caller's credentials, as the bus reported them."""
        return self.server.spec.creator

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> Annotated[str, DBusSignature("s")]:
        """The minted socket's address ('' for a launcher-provided socket)."""
        return self.server.address

    @dbus_property(access=PropertyAccess.READ)
    def SocketPath(self) -> Annotated[bytes, DBusSignature("ay")]:
        """The minted socket's path with a trailing NUL (empty for ListenFD)."""
        p = self.server.socket_path
        return os.fsencode(p) + b"\0" if p else b""

    @dbus_property(access=PropertyAccess.READ)
    def Listening(self) -> Annotated[bool, DBusSignature("b")]:
        """Whether the server still accepts connections."""
        return self.server.listening

    @dbus_property(access=PropertyAccess.READ)
    def Connections(self) -> Annotated[list[str], DBusSignature("as")]:
        """Unique names of the live confined connections."""
        return self.server.connection_names()

    @dbus_property(access=PropertyAccess.READ)
    def MessagesForwarded(self) -> Annotated[int, DBusSignature("t")]:
        """Messages that crossed the proxy."""
        return self.server.messages_forwarded

    @dbus_property(access=PropertyAccess.READ)
    def MessagesDenied(self) -> Annotated[int, DBusSignature("t")]:
        """Messages denied or dropped by the filter."""
        return self.server.messages_denied

    @dbus_method()
    async def Stop(self) -> None:
        """Same as the manager's StopServer for this server."""
        msg = current_message()
        server = await self.ctx.check_may_stop(msg.sender, self.server.path)
        server.stop()

    @dbus_method()
    async def StopListening(self) -> None:
        """Same as the manager's StopListening for this server."""
        msg = current_message()
        server = await self.ctx.check_may_stop(msg.sender, self.server.path)
        server.stop_listening()

    @dbus_method()
    async def SetPolicy(self, named_arguments: ASV) -> None:
        """Replace Filter/Policy/Call/Broadcast for live and future connections."""
        msg = current_message()
        server = await self.ctx.check_may_stop(msg.sender, self.server.path)
        try:
            enabled, policy = parse_policy_arguments(named_arguments)
        except ArgumentError as exc:
            raise errors.invalid_args(str(exc)) from exc
        server.set_filter(FilterSettings(enabled, policy))


_EMITS_CHANGED = "org.freedesktop.DBus.Property.EmitsChangedSignal"
# Counters change on every message: say so, so that caching proxies re-read them.
for _prop in (ServerObject.MessagesForwarded, ServerObject.MessagesDenied):
    _prop.introspection.annotations[_EMITS_CHANGED] = "false"  # type: ignore[attr-defined]
# What AddServer fixed never changes.
for _prop in (
    ServerObject.ContainerType,
    ServerObject.AppID,
    ServerObject.InstanceID,
    ServerObject.Metadata,
    ServerObject.Creator,
    ServerObject.Address,
    ServerObject.SocketPath,
):
    _prop.introspection.annotations[_EMITS_CHANGED] = "const"  # type: ignore[attr-defined]


async def answer_connection_credentials(ctx: ServiceContext, msg: Message) -> None:
    """GetConnectionCredentials with ProcessFD; resent without it if the caller refuses fds."""
    try:
        bus_name = str(msg.body[0])
        session = await ctx.resolve_session(bus_name, msg.sender)
        creds = credentials_dict(session.creds, session.server)
        if msg.flags.value & 0x1:  # NO_REPLY_EXPECTED
            return
        pidfd = session.creds.pidfd
        if pidfd is None:
            ctx.bus.send(Message.new_method_return(msg, "a{sv}", [creds]))
            return
        with_fd = dict(creds)
        with_fd["ProcessFD"] = Variant("h", 0)
        reply = Message.new_method_return(msg, "a{sv}", [with_fd], [pidfd])
        fallback = Message.new_method_return(msg, "a{sv}", [creds])
        ctx.send_reply_with_fds(msg, reply, fallback)
    except DBusError as exc:
        if not msg.flags.value & 0x1:
            ctx.bus.send(exc._as_message(msg))
    except Exception:
        log.exception("GetConnectionCredentials failed")
        if not msg.flags.value & 0x1:
            ctx.bus.send(Message.new_error(msg, errors.FAILED, "internal error"))


async def _run_without_reply(method: Any, target: ServiceInterface, msg: Message) -> None:
    """Run a method for a call that wants no reply; refusals are logged at debug level.

    The body goes as it arrived: handles stay indices, which methods taking fds
    resolve with attached_fd (the same as when a reply is wanted).
    """
    try:
        result = method.fn(target, *msg.body)
        if inspect.isawaitable(result):
            await result
    except DBusError as exc:
        log.debug("%s from %s (no reply wanted): %s", msg.member, msg.sender, exc.text)
    except Exception:
        log.exception("%s from %s failed", msg.member, msg.sender)


def attached_fd(msg: Message, handle: object, key: str) -> int:
    """Our own dup of the fd that handle argument ``key`` indexes in ``msg``'s attached fds.

    Every handle argument goes through here: a handle is an index into the fds
    that came with *this* message, never one of the service's own fd numbers
    (dbus-fast leaves the bare index in the body when no fd came with it).
    """
    fds = msg.unix_fds or []
    if type(handle) is not int or not 0 <= handle < len(fds):
        raise errors.invalid_args(
            f"named argument {key}: handle {handle} does not index a file descriptor "
            f"attached to this message ({len(fds)} attached)"
        )
    try:
        return os.dup(fds[handle])
    except OSError as exc:
        raise errors.invalid_args(
            f"named argument {key}: the file descriptor of handle {handle} is unusable: "
            f"{exc.strerror}"
        ) from exc


def _socket_kind(fd: int, key: str) -> tuple[int, int, bool]:
    """(family, type, listening) of a socket we were handed; InvalidArgs if it is none."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise errors.invalid_args(f"{key} is not a socket: {exc.strerror}") from exc
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        return sock.family, kind, listening
    except OSError as exc:
        raise errors.invalid_args(f"{key}: cannot inspect the socket: {exc.strerror}") from exc
    finally:
        sock.close()


def _check_connector(fd: int) -> None:
    """The anchor's socket (SPEC 10) must be a unix SOCK_SEQPACKET socket."""
    family, kind, _listening = _socket_kind(fd, CONNECTOR)
    if family != socket.AF_UNIX or kind != socket.SOCK_SEQPACKET:
        raise errors.invalid_args(
            f"{CONNECTOR} must be a connected unix SOCK_SEQPACKET socket"
        )
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.getpeername()  # a socketpair end answers ''; an unconnected one ENOTCONN
    except OSError as exc:
        raise errors.invalid_args(
            f"{CONNECTOR} must be a connected unix SOCK_SEQPACKET socket: {exc.strerror}"
        ) from exc


def _check_listen_fd(fd: int) -> socket.socket:
    """Wrap a launcher's fd; it must be a listening unix stream socket."""
    family, kind, listening = _socket_kind(fd, LISTEN_FD)
    if family != socket.AF_UNIX or kind != socket.SOCK_STREAM or not listening:
        raise errors.invalid_args(f"{LISTEN_FD} must be a listening unix SOCK_STREAM socket")
    return socket.socket(fileno=os.dup(fd))


def managed_objects_reply(msg: Message, objects: list[tuple[str, ServiceInterface]]) -> Message:
    """GetManagedObjects answered from ``objects`` alone (those at or below the called path).

    What a confined caller gets: the manager and its own server, never another
    instance (SPEC 12).
    """
    base = msg.path or "/"
    result: dict[str, dict[str, dict[str, Variant]]] = {}
    for path, obj in objects:
        if base == "/" or path.startswith(base + "/"):
            props = {
                p.name: Variant(p.signature, getattr(obj, p.name))
                for p in obj.introspect().properties
            }
            result[path] = {obj.name: props}
    return Message.new_method_return(msg, "a{oa{sa{sv}}}", [result])


def install_dispatch_hooks(ctx: ServiceContext, manager: ManagerInterface) -> None:
    """Record the current message for methods; map signature mismatches to InvalidArgs."""
    bus = ctx.bus
    loop = asyncio.get_running_loop()
    known: dict[tuple[str, str], str] = {}
    methods: dict[tuple[str, str], Any] = {}
    for iface in (manager, ServerObject(ctx, None)):  # type: ignore[arg-type]
        for m in ServiceInterface._get_methods(iface):
            known[(iface.name, m.name)] = m.in_signature
            methods[(iface.name, m.name)] = m
    tasks: set[asyncio.Task[None]] = set()

    def run_task(coro: Any) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def pre_dispatch(msg: Message) -> Message | bool | None:
        if msg.unix_fds:
            fds = list(msg.unix_fds)
            # Close after the method's first step has dup'ed what it keeps.
            loop.call_soon(loop.call_soon, close_fds, fds)
        if ctx.handle_fd_refusal(msg):
            return True
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        _current_message.set(msg)
        if msg.interface == OBJECT_MANAGER and msg.member == "GetManagedObjects":
            own = ctx.registry.session_for(msg.sender) if msg.sender else None
            if own is not None:
                # dbus-fast answers on any path with every exported object.
                own_obj = ctx.server_objects.get(own.server.path)
                shown: list[tuple[str, ServiceInterface]] = [(PATH, manager)]
                if own_obj is not None:
                    shown.append((own.server.path, own_obj))
                return managed_objects_reply(msg, shown)
        if (
            msg.path == PATH
            and msg.member == "Introspect"
            and msg.interface in (None, "org.freedesktop.DBus.Introspectable")
        ):
            own = ctx.registry.session_for(msg.sender) if msg.sender else None
            if own is not None:
                # A confined caller sees only its own server among the children.
                node = bus._introspect_export_path(PATH)
                mine = own.server.path.rsplit("/", 1)[1]
                node.nodes = [n for n in node.nodes if n.name == mine]
                return Message.new_method_return(msg, "s", [node.tostring()])
        if msg.path and _path_is_ours(msg.path):
            own = ctx.registry.session_for(msg.sender) if msg.sender else None
            if own is not None and own.server.path != msg.path:
                return Message.new_error(
                    msg,
                    errors.ACCESS_DENIED,
                    "a confined connection may only inspect its own server",
                )
        if msg.path == PATH or (msg.path and _path_is_ours(msg.path)):
            iface = msg.interface or (INTERFACE if msg.path == PATH else SERVER_INTERFACE)
            expected = known.get((iface, msg.member or ""))
            if expected is not None and expected != msg.signature:
                return Message.new_error(
                    msg,
                    errors.INVALID_ARGS,
                    f"{iface}.{msg.member} takes arguments of type '{expected}', "
                    f"not '{msg.signature}'",
                )
            if (
                msg.path == PATH
                and iface == INTERFACE
                and msg.member == "GetConnectionCredentials"
                and expected == msg.signature
            ):
                run_task(answer_connection_credentials(ctx, msg))
                return True
            if msg.flags.value & 0x1 and expected is not None:
                # NO_REPLY_EXPECTED: do the work, but a refusal is the caller's
                # business, not an error of ours to log with a traceback.
                target = manager if msg.path == PATH else ctx.server_objects.get(msg.path or "")
                if target is not None and target.name == iface:
                    run_task(_run_without_reply(methods[(iface, msg.member or "")], target, msg))
                return True
        return None

    bus.add_message_handler(pre_dispatch)

