"""AddServer again for a socket a server already listens on: the launcher re-registers.

After a restart that kept the listening sockets (a hand-over, a fd store), a
launcher that noticed the service going away (the drop-in) calls AddServer again
with the same socket as ListenFD. Creating a second server on it would make two
servers accept from one socket; instead the call is answered with the server that
has it, which takes the new Connector and StopOnNotify fd. A socket already served
for another app instance is refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from dbus_fast import Variant

from xdg_containers.io.anchor_link import AnchorLink
from xdg_containers.servers.arguments import CONNECTOR
from xdg_containers.servers.server import ContainerServer
from xdg_containers.service import errors
from xdg_containers.service.context import ServiceContext
from xdg_containers.service.objects import add_server_results

log = logging.getLogger(__name__)


def server_on(ctx: ServiceContext, sock: socket.socket) -> ContainerServer | None:
    """The live server listening on ``sock`` (by its device and inode), if any."""
    st = os.fstat(sock.fileno())
    socket_id = (st.st_dev, st.st_ino)
    for server in ctx.registry:
        if server.listening and server.socket_id == socket_id:
            return server
    return None


def reregister(
    ctx: ServiceContext, server: ContainerServer, identity: tuple[str, str, str],
    dup_fds: dict[str, int], caller: str, creator: dict[str, Variant],
) -> list[Any]:
    """AddServer's answer for ``server``, re-registered by ``caller`` (whose credentials
    are ``creator``) with (type, app id, instance id) ``identity``; takes the Connector
    and StopOnNotify fds out of ``dup_fds``."""
    spec = server.spec
    if identity != (spec.container_type, spec.app_id, spec.instance_id):
        raise errors.invalid_args(
            f"ListenFD is already served by {server.path} for {spec.container_type} "
            f"{spec.app_id!r} instance {spec.instance_id!r}, not for this instance")
    if CONNECTOR in dup_fds:
        old = server.anchor
        new = AnchorLink(asyncio.get_running_loop(), socket.socket(fileno=dup_fds.pop(CONNECTOR)))
        server.attach_anchor(new)
        if old is not None:
            server.spares.forget(old)
            # Clients accepted meanwhile may wait for the old anchor: the new one answers.
            old.pass_pending_to(new)
            old.close()
    if "StopOnNotify" in dup_fds:
        server.watch_notify_fd(dup_fds.pop("StopOnNotify"))
    if caller != server.creator_name:
        # The launcher's connection now: its old one (gone with a crash, or closed
        # once it registered again) must not stop the server it just got back.
        server.spec.creator = dict(creator)
        ctx.registry.change_creator(server, caller)
    log.info("%s: registered again by its launcher (same listening socket)", server.path)
    return [server.path, add_server_results(server)]
