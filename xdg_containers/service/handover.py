"""``serve --replace``: the running service hands its servers to a new process (SPEC 13).

The new process takes the bus name first (the running one owns it with
ALLOW_REPLACEMENT), holding calls to its objects until it is ready; then it asks
the previous owner, at its unique name, ``org.freedesktop.XdgContainers1.Handover.
Begin``. The old process answers once the AddServer calls it was running are done:
every server's record, a dup of its listening socket, anchor Connector and
StopOnNotify fd, and every live connection (unique name, real client's credentials
and pidfd). From then on it accepts nothing, keeps forwarding the connections it
has until each closes, and exits 0 when the last one has. Connections it had not
yet named at that moment are sent with ``Adopt`` once they are.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from dbus_fast import DBusError, Message, MessageType

from xdg_containers.io.peercred import PeerCredentials
from xdg_containers.io.spare import spares_for
from xdg_containers.servers.adopted import AdoptedConnection
from xdg_containers.servers.record import record_from_json
from xdg_containers.servers.server import ContainerServer, ServerSession
from xdg_containers.service import errors
from xdg_containers.service.context import HANDOVER_INTERFACE, NAME, PATH, ServiceContext
from xdg_containers.service.persistence import Persistence, kept_fds, record_of
from xdg_containers.service.restore import Kept, RestoreError, restore_server

log = logging.getLogger(__name__)

#: Seconds the old process waits for its running AddServer calls and anchor requests.
SETTLE_TIMEOUT = 10.0
#: fds per ``Fds`` reply: the kernel passes at most 253 per message, and a system bus
#: may allow as few as 16 (dbus-daemon's max_message_unix_fds).
FDS_PER_CALL = 16
#: Seconds the old process keeps the handed-over fds for the new one to fetch.
FETCH_TIMEOUT = 60.0


class HandoverError(Exception):
    """The hand-over failed; the text says why."""


def _connection(session: ServerSession, fds: list[int]) -> dict[str, Any]:
    creds = session.creds
    entry: dict[str, Any] = {
        "name": session.unique_name, "pid": creds.pid, "uid": creds.uid, "gid": creds.gid,
        "groups": list(creds.groups),
        "label": creds.security_label.hex() if creds.security_label is not None else None,
        "pidfd": None,
    }
    if creds.pidfd is not None:
        entry["pidfd"] = len(fds)
        fds.append(os.dup(creds.pidfd))
    return entry


def _close_later(fds: list[int], delay: float = 10.0) -> None:
    """Close our dups once the message carrying them has surely been written."""
    def close() -> None:
        for fd in fds:
            os.close(fd)
    asyncio.get_running_loop().call_later(delay, close)


def _fd_index(fd: int | None, fds: list[int]) -> int | None:
    if fd is None:
        return None
    fds.append(os.dup(fd))
    return len(fds) - 1


async def _settled(server: ContainerServer) -> None:
    """Until the server's anchor has no request in flight (its answers are ours)."""
    anchor = server.anchor
    while anchor is not None and not anchor.closed and anchor.busy:
        await asyncio.sleep(0.005)


class HandoverSource:
    """The old process's side: answers Begin once, then drains."""

    def __init__(self, ctx: ServiceContext, on_handed_over: Callable[[], None]) -> None:
        """``on_handed_over`` runs once the state went to the new process."""
        self.ctx = ctx
        self.on_handed_over = on_handed_over
        self.successor: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sent: dict[str, set[str]] = {}  # server path -> names the successor knows
        self._fds: list[int] = []
        #: set once the successor fetched every fd (or gave up): only then may we exit
        self.fetched = asyncio.Event()

    def handle(self, msg: Message) -> bool | None:
        """The message handler: Begin at the manager's path (anything else goes on)."""
        if (msg.message_type != MessageType.METHOD_CALL or msg.interface != HANDOVER_INTERFACE
                or msg.path != PATH):
            return None
        if msg.member == "Stop" and msg.signature == "o" and msg.sender == self.successor:
            # The new process stopped a server: close the connections we still forward.
            server = self.ctx.registry.get(str(msg.body[0]))
            if server is not None:
                server.stop()
            return True
        if msg.member == "Fds" and msg.signature == "uu":
            self._send_fds(msg)
            return True
        if msg.member != "Begin" or msg.signature != "":
            self.ctx.bus.send(Message.new_error(
                msg, errors.UNKNOWN_METHOD, f"{HANDOVER_INTERFACE}: Begin(), Fds(uu), Stop(o)"))
            return True
        task = asyncio.get_running_loop().create_task(self._begin(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _begin(self, msg: Message) -> None:
        ctx = self.ctx
        try:
            await self._check_caller(msg)
            spares_for(asyncio.get_running_loop()).close()  # no more anchor requests of ours
            await asyncio.wait_for(self._settle(), SETTLE_TIMEOUT)
            body, fds = self._snapshot()
        except DBusError as exc:
            ctx.bus.send(Message.new_error(msg, exc.type, exc.text))
            return
        except TimeoutError:
            ctx.bus.send(Message.new_error(msg, errors.FAILED, "running calls did not finish "
                                           f"within {SETTLE_TIMEOUT:.0f} s"))
            return
        self.successor = msg.sender
        for server in ctx.registry:
            self._sent[server.path] = set(server.connection_names())
        # The fds go in batches (Fds): one message could not carry them all.
        self._fds = fds
        if not fds:
            self.fetched.set()
        ctx.bus.send(Message.new_method_return(msg, "su", [body, len(fds)]))
        _close_later(fds, FETCH_TIMEOUT)
        log.info("handed %d server(s) over to %s; forwarding the live connections until "
                 "they close", len(ctx.registry), msg.sender)
        ctx.persistence = Persistence(None)  # the records are the new process's now
        self.on_handed_over()
        for server in ctx.registry:
            if server.anchor is not None:
                # The anchor answers the new process now: an answer we read would be lost
                # to it. (Its copy of the Connector keeps the anchor alive.)
                server.anchor.close()
            server.stop_listening(unlink=False)

    async def fds_fetched(self) -> None:
        """Until the successor has every fd (or FETCH_TIMEOUT passed): before that, this
        process must stay on the bus, even with nothing left to forward."""
        try:
            await asyncio.wait_for(self.fetched.wait(), FETCH_TIMEOUT)
        except TimeoutError:
            log.warning("the new process did not fetch the servers' fds within %.0f s",
                        FETCH_TIMEOUT)

    def _send_fds(self, msg: Message) -> None:
        """Fds(first, count): the handed-over fds [first, first + count), to the successor."""
        first, count = int(msg.body[0]), int(msg.body[1])
        if msg.sender != self.successor or self.successor is None:
            reply = Message.new_error(msg, errors.ACCESS_DENIED, "only the new process may ask")
        elif count > FDS_PER_CALL or first + count > len(self._fds):
            reply = Message.new_error(msg, errors.INVALID_ARGS, f"at most {FDS_PER_CALL} of "
                                      f"the {len(self._fds)} fds")
        else:
            chunk = self._fds[first:first + count]
            reply = Message.new_method_return(msg, "ah", [list(range(count))], chunk)
            if first + count == len(self._fds):
                self.fetched.set()
        self.ctx.bus.send(reply)

    async def _check_caller(self, msg: Message) -> None:
        ctx = self.ctx
        if self.successor is not None:
            raise errors.failed(f"already handed over to {self.successor}")
        sender = msg.sender or ""
        if ctx.registry.is_confined(sender):
            raise errors.access_denied("Begin cannot be called from inside a container")
        if await ctx.caller_uid(sender) != os.getuid():
            raise errors.access_denied("only a service of the same user may take over")
        if await ctx.owner_or_none(NAME) != sender:
            raise errors.access_denied(f"only the new owner of {NAME} may take over")

    async def _settle(self) -> None:
        ctx = self.ctx
        await ctx.add_servers_done()
        for server in ctx.registry:
            await _settled(server)

    def _snapshot(self) -> tuple[str, list[int]]:
        fds: list[int] = []
        servers = []
        for server in self.ctx.registry:
            # The same fds a fd store keeps for a crash: listen, connector, notify.
            entry: dict[str, Any] = {
                kind: _fd_index(fd, fds) for kind, fd in kept_fds(server).items()}
            entry.update(
                record=record_of(server).to_json(), listening=server.listening,
                connections=[_connection(s, fds) for s in server.sessions if s.unique_name])
            servers.append(entry)
        return json.dumps({"servers": servers}), fds

    def session_named(self, server: ContainerServer) -> None:
        """After the hand-over, a connection got its name: tell the new process."""
        if self.successor is None:
            return
        known = self._sent.setdefault(server.path, set())
        for session in server.sessions:
            if session.unique_name and session.unique_name not in known:
                known.add(session.unique_name)
                fds: list[int] = []
                body = json.dumps({"path": server.path, **_connection(session, fds)})
                self.ctx.bus.send(Message(
                    destination=self.successor, path=PATH, interface=HANDOVER_INTERFACE,
                    member="Adopt", signature="s", body=[body], unix_fds=fds,
                    flags=0x1))
                _close_later(fds)


def _creds(entry: dict[str, Any], fds: list[int]) -> PeerCredentials:
    label = entry.get("label")
    pidfd_index = entry.get("pidfd")
    creds = PeerCredentials(
        pid=int(entry["pid"]), uid=int(entry["uid"]), gid=int(entry["gid"]),
        groups=[int(g) for g in entry.get("groups", [])],
        security_label=bytes.fromhex(label) if isinstance(label, str) else None,
        completed=True,
    )
    if isinstance(pidfd_index, int) and 0 <= pidfd_index < len(fds):
        creds.pidfd = os.dup(fds[pidfd_index])
    return creds


def adopt(ctx: ServiceContext, server: ContainerServer, entry: dict[str, Any],
          fds: list[int]) -> None:
    """One connection the old process forwards: confined, answered for by us."""
    name = str(entry["name"])
    if not name.startswith(":") or ctx.tracker.is_gone(name):
        return
    ctx.registry.adopt(AdoptedConnection(server, name, _creds(entry, fds)))


async def take_over(ctx: ServiceContext, old_owner: str) -> int:
    """Ask ``old_owner`` for its servers and bring each back here; how many came."""
    reply = await _call(ctx, old_owner, "Begin", "", [])
    body, total = str(reply.body[0]), int(reply.body[1])
    fds: list[int] = []
    try:
        while len(fds) < total:
            count = min(FDS_PER_CALL, total - len(fds))
            chunk = await _call(ctx, old_owner, "Fds", "uu", [len(fds), count])
            # Our own copies at once: the dispatch hook closes the reply's fds soon.
            fds += [os.dup(fd) for fd in chunk.unix_fds]
            if len(chunk.unix_fds) != count:
                raise HandoverError(f"{old_owner} sent {len(chunk.unix_fds)} fds, not {count}")
        return await _restore_all(ctx, json.loads(body), fds)
    finally:
        for fd in fds:
            os.close(fd)


async def _call(ctx: ServiceContext, old_owner: str, member: str, signature: str,
                body: list[Any]) -> Message:
    reply = await ctx.bus.call(Message(
        destination=old_owner, path=PATH, interface=HANDOVER_INTERFACE, member=member,
        signature=signature, body=body))
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        text = str(reply.body[0]) if reply.body else ""
        raise HandoverError(f"{old_owner} refused {member}: {reply.error_name}: {text}")
    return reply


def _kept(entry: dict[str, Any], fds: list[int]) -> Kept:
    def dup(key: str) -> int | None:
        index = entry.get(key)
        return os.dup(fds[index]) if isinstance(index, int) and 0 <= index < len(fds) else None

    listen, connector = dup("listen"), dup("connector")
    return Kept(
        listen=socket.socket(fileno=listen) if listen is not None else None,
        connector=socket.socket(fileno=connector) if connector is not None else None,
        notify_fd=dup("notify"),
    )


async def _restore_all(ctx: ServiceContext, data: dict[str, Any], fds: list[int]) -> int:
    count = 0
    for entry in data.get("servers", []):
        try:
            record = record_from_json(entry["record"])
            server = await restore_server(ctx, record, _kept(entry, fds),
                                          listening=bool(entry.get("listening")))
        except (RestoreError, ValueError, KeyError, OSError) as exc:
            log.error("hand-over: a server could not be taken over: %s", exc)
            continue
        for conn in entry.get("connections", []):
            adopt(ctx, server, conn, fds)
        if not server.listening:
            server.stop_listening()  # removed at once if no connection is left
        count += 1
    return count


def adopt_message(ctx: ServiceContext, msg: Message) -> bool | None:
    """The new process's handler for the old one's ``Adopt`` (late-named connections)."""
    if (msg.message_type != MessageType.METHOD_CALL or msg.interface != HANDOVER_INTERFACE
            or msg.member != "Adopt" or msg.path != PATH):
        return None
    # The fds are dup'ed by adopt(); the dispatch hook closes the message's own.
    if msg.sender != ctx.predecessor or msg.signature != "s":
        return True
    try:
        entry = json.loads(str(msg.body[0]))
        server = ctx.registry.get(str(entry.get("path")))
        if server is not None:
            adopt(ctx, server, entry, list(msg.unix_fds))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("hand-over: an Adopt from %s was malformed: %s", msg.sender, exc)
    return True
