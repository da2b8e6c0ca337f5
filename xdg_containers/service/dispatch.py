"""The pre-dispatch handler: what the service answers before dbus-fast routes a call.

It records the call for ``current_message``, answers Introspect and GetManagedObjects for
our objects (a confined caller sees only its own server), refuses a known method called
with the wrong signature (InvalidArgs), answers per-server calls on a removed server with
NotContainer, and runs GetConnectionCredentials (which can attach a pidfd) and calls that
want no reply itself. Everything else goes on to dbus-fast's ServiceInterface dispatch.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.service import ServiceInterface

from xdg_containers.compat.dbusfast import Member, keep_message, redispatch
from xdg_containers.io.endpoint import close_fds
from xdg_containers.service import errors
from xdg_containers.service.authorization import (
    is_server_path,
    live_server,
    may_see_path,
    own_session,
    resolve_session,
)
from xdg_containers.service.context import (
    HANDOVER_INTERFACE,
    INTERFACE,
    PATH,
    SERVER_INTERFACE,
    ServiceContext,
    set_current_message,
)
from xdg_containers.service.introspection import managed_objects_reply, method_table, node_xml
from xdg_containers.service.manager import ManagerInterface
from xdg_containers.service.objects import ServerObject, credentials_dict

log = logging.getLogger(__name__)

OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
NO_REPLY_EXPECTED = 0x1


async def answer_connection_credentials(ctx: ServiceContext, msg: Message) -> None:
    """GetConnectionCredentials with ProcessFD; resent without it if the caller refuses fds."""
    try:
        bus_name = str(msg.body[0])
        session = await resolve_session(ctx, bus_name, msg.sender)
        creds = credentials_dict(session.creds, session.server)
        if msg.flags.value & NO_REPLY_EXPECTED:
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
        if not msg.flags.value & NO_REPLY_EXPECTED:
            ctx.bus.send(Message.new_error(msg, exc.type, exc.text))
    except Exception:
        log.exception("GetConnectionCredentials failed")
        if not msg.flags.value & NO_REPLY_EXPECTED:
            ctx.bus.send(Message.new_error(msg, errors.FAILED, "internal error"))


async def _run_without_reply(method: Member, target: ServiceInterface, msg: Message) -> None:
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


def _introspect(ctx: ServiceContext, manager: ManagerInterface, msg: Message) -> Message:
    """Introspect at the manager's path or a server's; a confined caller sees only its
    own server among the manager's children."""
    path = msg.path or ""
    if path == PATH:
        own = own_session(ctx, msg.sender)
        children = [
            p.rsplit("/", 1)[1]
            for p in ctx.server_objects
            if own is None or own.server.path == p
        ]
        return Message.new_method_return(msg, "s", [node_xml(path, [manager], children)])
    return Message.new_method_return(msg, "s", [node_xml(path, [ctx.server_objects[path]], [])])


def _confined_managed_objects(
    ctx: ServiceContext, manager: ManagerInterface, msg: Message
) -> Message | None:
    """GetManagedObjects for a confined caller: the manager and its own server only
    (dbus-fast answers everyone else, on any path, with every exported object)."""
    own = own_session(ctx, msg.sender)
    if own is None:
        return None
    shown: list[tuple[str, ServiceInterface]] = [(PATH, manager)]
    own_obj = ctx.server_objects.get(own.server.path)
    if own_obj is not None:
        shown.append((own.server.path, own_obj))
    return managed_objects_reply(msg, shown)


def _is_server_call(msg: Message, methods: dict[tuple[str, str], Member]) -> bool:
    """Whether ``msg`` calls a method of the Server interface (Properties calls are not:
    on a removed server they stay UnknownObject, the object being gone)."""
    iface = msg.interface or SERVER_INTERFACE
    return (iface, msg.member or "") in methods and iface == SERVER_INTERFACE


def _for_our_objects(msg: Message) -> bool:
    """A method call to the manager or a server object (not the hand-over's own calls)."""
    path = msg.path or ""
    return (msg.message_type == MessageType.METHOD_CALL
            and (path == PATH or is_server_path(path))
            and msg.interface != HANDOVER_INTERFACE)


def install_dispatch_hooks(ctx: ServiceContext, manager: ManagerInterface) -> None:
    """Record the current message for methods; answer what dbus-fast cannot (see above)."""
    bus = ctx.bus
    loop = asyncio.get_running_loop()
    methods = method_table([(INTERFACE, ManagerInterface), (SERVER_INTERFACE, ServerObject)])
    tasks: set[asyncio.Task[None]] = set()

    def run_task(coro: Any) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def held(msg: Message) -> None:
        await ctx.ready.wait()
        redispatch(bus, msg)

    def pre_dispatch(msg: Message) -> Message | bool | None:
        if not ctx.ready.is_set() and _for_our_objects(msg):
            # Taking the servers over (serve --replace): answered once they are here,
            # in order (the fds stay open until then).
            run_task(held(keep_message(msg)))
            return True
        if msg.unix_fds:
            fds = list(msg.unix_fds)
            # Close after the method's first step has dup'ed what it keeps.
            loop.call_soon(loop.call_soon, close_fds, fds)
        if ctx.handle_fd_refusal(msg):
            return True
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        set_current_message(msg)
        if msg.interface == OBJECT_MANAGER and msg.member == "GetManagedObjects":
            return _confined_managed_objects(ctx, manager, msg)
        path = msg.path or ""
        on_server = is_server_path(path)
        if path != PATH and not on_server:
            return None
        if not may_see_path(ctx, msg.sender, path):
            return Message.new_error(
                msg, errors.ACCESS_DENIED, "a confined connection may only inspect its own server"
            )
        if on_server and path not in ctx.server_objects:
            # Removed (or never was): the SPEC's NotContainer, not dbus-fast's UnknownObject.
            if _is_server_call(msg, methods):
                try:
                    live_server(ctx, path)
                except DBusError as exc:
                    return Message.new_error(msg, exc.type, exc.text)
            return None
        if msg.member == "Introspect" and msg.interface in (None, INTROSPECTABLE):
            return _introspect(ctx, manager, msg)
        iface = msg.interface or (INTERFACE if path == PATH else SERVER_INTERFACE)
        method = methods.get((iface, msg.member or ""))
        if method is None:
            return None
        if method.in_signature != msg.signature:
            return Message.new_error(
                msg,
                errors.INVALID_ARGS,
                f"{iface}.{msg.member} takes arguments of type '{method.in_signature}', "
                f"not '{msg.signature}'",
            )
        if path == PATH and iface == INTERFACE and msg.member == "GetConnectionCredentials":
            run_task(answer_connection_credentials(ctx, msg))
            return True
        if msg.flags.value & NO_REPLY_EXPECTED:
            # Do the work, but a refusal is the caller's business, not an error of
            # ours to log with a traceback.
            target = manager if path == PATH else ctx.server_objects.get(path)
            if target is not None and target.name == iface:
                run_task(_run_without_reply(method, target, msg))
            return True
        return None

    bus.add_message_handler(pre_dispatch)
