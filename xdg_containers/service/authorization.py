"""Who may call what (SPEC 12): confined connections see only themselves and their own
server and create nothing; only a server's creator (by uid) may stop or change it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xdg_containers.servers.registry import SERVER_PATH_PREFIX
from xdg_containers.servers.server import ContainerServer
from xdg_containers.service import errors
from xdg_containers.service.context import BUS_DRIVER, ServiceContext
from xdg_containers.wire.names import is_valid_bus_name

if TYPE_CHECKING:
    from xdg_containers.servers.adopted import Confined as Session


def is_server_path(path: str) -> bool:
    """Whether ``path`` has the shape of one of our server objects' paths."""
    return path.startswith(SERVER_PATH_PREFIX) and path[len(SERVER_PATH_PREFIX) :].isdigit()


def own_session(ctx: ServiceContext, sender: str | None) -> Session | None:
    """The confined connection ``sender`` is, or None for an unconfined caller."""
    return ctx.registry.session_for(sender) if sender else None


def check_not_confined(ctx: ServiceContext, sender: str | None, what: str) -> None:
    """AccessDenied for calls that confined connections may not make (no nesting)."""
    if ctx.registry.is_confined(sender):
        raise errors.access_denied(f"{what} cannot be called from inside a container")


def live_server(ctx: ServiceContext, server_path: str) -> ContainerServer:
    """The live server at ``server_path``; NotContainer naming the path if there is none
    (never was, or was removed)."""
    server = ctx.registry.get(server_path)
    if server is None:
        raise errors.not_container(f"{server_path} is not a live container server")
    return server


async def check_may_stop(
    ctx: ServiceContext, sender: str | None, server_path: str
) -> ContainerServer:
    """The server at ``server_path`` if ``sender`` may stop or change it."""
    check_not_confined(ctx, sender, "stopping a server")
    server = live_server(ctx, server_path)
    assert sender is not None
    uid = await ctx.caller_uid(sender)
    if uid != server.creator_uid:
        raise errors.access_denied(
            f"uid {uid} may not stop {server_path}, created by uid {server.creator_uid}"
        )
    return server


def server_by_path(ctx: ServiceContext, path: str, caller: str | None) -> ContainerServer:
    """The live server at ``path``; a confined caller may only see its own."""
    own = own_session(ctx, caller)
    if own is not None and own.server.path != path:
        raise errors.access_denied("a confined connection may only ask about its own server")
    return live_server(ctx, path)


def may_see_path(ctx: ServiceContext, sender: str | None, path: str) -> bool:
    """Whether ``sender`` may inspect the object at ``path`` (a confined caller: only the
    manager and its own server)."""
    own = own_session(ctx, sender)
    return own is None or not is_server_path(path) or own.server.path == path


async def resolve_session(ctx: ServiceContext, bus_name: str, caller: str | None) -> Session:
    """The confined connection behind a bus name, with the SPEC's errors.

    A confined ``caller`` may only ask about itself: anything else is
    AccessDenied before any lookup, so the answer reveals nothing.
    """
    own = own_session(ctx, caller)
    if own is not None:
        if bus_name == caller:
            return own
        if bus_name.startswith(":") or await ctx.owner_or_none(bus_name) != caller:
            raise errors.access_denied(
                "a confined connection may only ask about its own connection"
            )
        return own
    if bus_name == BUS_DRIVER:
        raise errors.not_container(f"{bus_name} is the message bus itself, not a container")
    if not is_valid_bus_name(bus_name):
        raise errors.name_has_no_owner(bus_name)
    if bus_name.startswith(":"):
        session = ctx.registry.session_for(bus_name)
        if session is not None:
            return session
        owner = await ctx.owner(bus_name)
    else:
        owner = await ctx.owner(bus_name)
        session = ctx.registry.session_for(owner)
        if session is not None:
            return session
    raise errors.not_container(f"{bus_name!r} (owned by {owner}) is not in a container")
