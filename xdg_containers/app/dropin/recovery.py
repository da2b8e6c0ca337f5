"""The service-backed drop-in after trouble: judge it, register again, serve meanwhile.

Entered when a Connector closed or the bus told us the service's name lost its owner
(backed.py's ``run`` or the C front's anchor loop hands over). The listening sockets
never close and never move: clients that connect meanwhile wait in the backlog.

- The service stopped a server itself (it still runs, same unique name, answers a
  Ping): that group ends as before (its socket closes, so clients are refused).
- The service is gone (crash, kill, or an exit): every remaining group is registered
  again with AddServer (same socket as ListenFD, a fresh Connector, same arguments;
  the old Connectors are still answered until then, for a service restored from a
  fd store or keeper that kept their other ends),
  which activates the service; retried every 0.2 s doubling to 2 s, at once when the
  name gets an owner. If that has not worked within ``GRACE``, the groups are served in
  this process (inprocess.py's engine) until it does; then this process stops
  accepting *before* AddServer hands the socket over, so no socket is ever accepted on
  from two places, and connections it accepted stay with it until they close.
- Settled again (every group with the service, nothing served here any more): the C
  front's anchor loop takes the process back; without the front, this loop stays.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from xdg_containers.anchor.program import answer
from xdg_containers.app.dropin.anchorloop import exec_anchor_loop
from xdg_containers.app.dropin.args import Group
from xdg_containers.app.dropin.backed import ServiceBacked, SetupError
from xdg_containers.app.dropin.identity import Identity
from xdg_containers.app.dropin.inprocess import Engine, configure_logging
from xdg_containers.app.dropin.watch import ACTIVATION_TIMEOUT, ServiceWatch, service_lost
from xdg_containers.servers.server import ContainerServer

#: How long clients may wait in the backlog for the service before this process
#: serves them itself (docs/flatpak.md, "Service restarts").
GRACE = 1.0
FIRST_RETRY = 0.2
MAX_RETRY = 2.0
#: AddServer, once the name has an owner (it answers at once when it works).
REGISTER_TIMEOUT = 5.0
PREFIX = "xdg-containers-dbus-proxy: "

T = TypeVar("T")


def say(text: str) -> None:
    """One line on stderr (what flatpak shows of its proxy)."""
    sys.stderr.write(f"{PREFIX}{text}\n")
    sys.stderr.flush()


class Recovery:
    """The groups of one drop-in, from the first trouble until the sync fd closes."""

    def __init__(
        self,
        bus_address: str,
        groups: Sequence[Group],
        identity: Identity,
        listeners: Sequence[socket.socket | None],
        sync_fd: int | None,
        front_exe: str | None,
        args: Sequence[str],
    ) -> None:
        """``listeners[i]`` is None for a group that ended; ``adopt`` the registration."""
        self.bus_address = bus_address
        self.groups = list(groups)
        self.identity = identity
        self.listeners = list(listeners)
        self.sync_fd = sync_fd
        self.front_exe = front_exe
        self.args = list(args)
        self.bus: socket.socket | None = None
        self._bus_data = bytearray()  # a message not whole yet
        self.connectors: dict[int, socket.socket] = {}
        self.service_name = ""
        self.closed: set[int] = set()  # groups whose Connector closed, not judged yet
        self.retired: list[socket.socket] = []  # a gone service's Connectors and bus
        self.kept_buses: list[socket.socket] = []  # see _close_retired
        self.lost = False  # the registration is gone as a whole
        self.accepting: dict[int, ContainerServer] = {}
        self.engine: Engine | None = None
        self.watch = ServiceWatch(bus_address)
        self.serving_said = False
        self._failure = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done = asyncio.Event()
        self._trouble = asyncio.Event()

    def adopt(
        self, bus: socket.socket, connectors: dict[int, socket.socket], service_name: str
    ) -> None:
        """The registration in force: its bus connection and each group's Connector."""
        self.bus = bus
        self._bus_data = bytearray()
        self.connectors = dict(connectors)
        self.service_name = service_name

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until the sync fd's reader is gone (or SIGTERM/SIGINT); 0 then."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self.sync_fd is not None:
            loop.add_reader(self.sync_fd, self._done.set)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._done.set)
        self._watch_registration()
        try:
            while not self._done.is_set():
                if self._trouble.is_set():
                    self._trouble.clear()
                    if await self._service_gone():
                        await self._recover()
                        continue
                if self._settled() and self.front_exe:
                    self._hand_to_front()
                await self._wait_any(self._trouble, timeout=1.0)
        finally:
            self._close()
        return 0

    async def _wait_any(self, event: asyncio.Event | None, timeout: float) -> None:
        """Until ``event`` or the end is set, or ``timeout`` passed."""
        waits = [asyncio.ensure_future(self._done.wait())]
        if event is not None:
            waits.append(asyncio.ensure_future(event.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _unless_done(self, make: Callable[[], Awaitable[T]], timeout: float) -> T | None:
        """``make()``'s result, or None if it takes over ``timeout`` or the end comes."""
        task = asyncio.ensure_future(make())
        done = asyncio.ensure_future(self._done.wait())
        try:
            await asyncio.wait([task, done], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
        if task.done():
            return task.result()
        task.cancel()
        return None

    # -- the registration's sockets ---------------------------------------------------------

    def _watch_registration(self) -> None:
        """Read the bus connection and answer the Connectors from this loop. What the
        anchor loop left unread (an EOF, a notice) is seen at once: trouble."""
        assert self._loop is not None
        if self.bus is not None:
            self.bus.setblocking(False)
            self._loop.add_reader(self.bus.fileno(), self._bus_readable)
            self._bus_readable()
        for i, conn in list(self.connectors.items()):
            conn.setblocking(False)
            self._loop.add_reader(conn.fileno(), self._connector_readable, i)
            self._connector_readable(i)

    def _bus_readable(self) -> None:
        assert self.bus is not None and self._loop is not None
        data = self._bus_data
        try:
            while True:
                chunk = self.bus.recv(65536)
                if not chunk:
                    raise ConnectionResetError("the bus closed our connection")
                data += chunk
        except BlockingIOError:
            pass
        except OSError:
            self._loop.remove_reader(self.bus.fileno())
            self.lost = True
        # Only the loss notice is routed to us (backed.LOSS_MATCH); the rest is noise.
        lost, used = service_lost(bytes(data))
        del data[:used]
        if lost:
            self.lost = True
        if self.lost:
            self._trouble.set()

    def _connector_readable(self, i: int) -> None:
        conn = self.connectors[i]
        try:
            request = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            request = b""
        if request:
            try:
                answer(conn, request)
            except OSError:
                pass  # the service is going away: its EOF follows
            return
        assert self._loop is not None
        self._loop.remove_reader(conn.fileno())
        self.closed.add(i)
        self._trouble.set()

    def _retire_registration(self) -> None:
        """Set the registration aside: its Connectors are still answered (a service
        restored from a fd store or keeper may use them until we register again) and
        closed on EOF or once registered again; its bus connection closes then too."""
        assert self._loop is not None
        for conn in self.connectors.values():
            self._loop.remove_reader(conn.fileno())
            self.retired.append(conn)
            self._loop.add_reader(conn.fileno(), self._retired_readable, conn)
        if self.bus is not None:
            self._loop.remove_reader(self.bus.fileno())
            self.retired.append(self.bus)
        self.connectors = {}
        self.bus = None
        self.closed.clear()
        self.lost = False

    def _retired_readable(self, conn: socket.socket) -> None:
        try:
            request = conn.recv(65536)
            if request:
                answer(conn, request)
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close_retired(conn)

    def _close_retired(self, only: socket.socket | None = None) -> None:
        """Close the retired Connectors (or ``only`` that one); a retired bus connection
        stays open for the process's life: a server restored from a fd store may still
        name it as its creator, and StopOnDisconnect would end it with that connection.
        It is inheritable, so it survives the execs to and from the anchor loop."""
        assert self._loop is not None
        for sock in list(self.retired):
            if only is None or sock is only:
                self._loop.remove_reader(sock.fileno())
                self.retired.remove(sock)
                if sock.type == socket.SOCK_STREAM:
                    sock.set_inheritable(True)
                    self.kept_buses.append(sock)
                else:
                    sock.close()

    # -- judging ----------------------------------------------------------------------------

    async def _service_gone(self) -> bool:
        """Whether the registration's service is gone; groups whose server it stopped
        itself end here."""
        if self.bus is None or self.lost:
            return True
        if not self.closed:
            return False
        owner = await self.watch.owner()
        if owner is None or owner != self.service_name or not await self.watch.ping(owner):
            return True
        for i in sorted(self.closed):
            say(f"the service stopped the server of {self.groups[i].path}; it ends")
            assert self._loop is not None
            conn = self.connectors.pop(i)
            conn.close()
            listener = self.listeners[i]
            if listener is not None:
                listener.close()  # refused from now on, as once the service closed it
            self.listeners[i] = None
        self.closed.clear()
        return False

    # -- getting the service back -------------------------------------------------------

    def _live(self) -> list[int]:
        return [i for i, sock in enumerate(self.listeners) if sock is not None]

    async def _recover(self) -> None:
        """Register every remaining group again; serve them here after ``GRACE``."""
        self._retire_registration()
        live = self._live()
        if not live:
            self._close_retired()
            return
        say("the xdg-containers service went away; registering again")
        self.watch.owner_appeared.clear()
        self._failure = ""
        grace_end = time.monotonic() + GRACE
        delay = FIRST_RETRY
        while not self._done.is_set():
            serving = bool(self.accepting)
            limit = ACTIVATION_TIMEOUT if serving else max(0.05, grace_end - time.monotonic())
            if await self._unless_done(self.watch.activate, limit):
                self._pause_inprocess()
                if await self._register(live):
                    return
            if time.monotonic() >= grace_end and not self.accepting:
                await self._serve_inprocess(live)
            await self._wait_any(self.watch.owner_appeared, timeout=delay)
            self.watch.owner_appeared.clear()
            delay = min(2 * delay, MAX_RETRY)

    async def _register(self, live: list[int]) -> bool:
        backed = ServiceBacked(self.bus_address, [self.groups[i] for i in live], self.identity)
        listeners = [sock for i in live if (sock := self.listeners[i]) is not None]
        deadline = time.monotonic() + REGISTER_TIMEOUT
        try:
            await asyncio.to_thread(backed.setup, listeners, deadline)
        except SetupError as exc:
            if str(exc) != self._failure:  # once per reason, not once per retry
                self._failure = str(exc)
                say(f"registering again failed ({exc}); trying again")
            return False
        assert backed.bus is not None
        self.adopt(backed.bus, dict(zip(live, backed.connectors, strict=True)),
                   backed.service_name)
        self._watch_registration()
        self._close_retired()  # the service has the new Connectors now
        say("registered again with the xdg-containers service: " + " ".join(backed.server_paths))
        return True

    def _pause_inprocess(self) -> None:
        """Stop accepting here (connections already accepted carry on)."""
        for server in self.accepting.values():
            server.stop_listening()  # closes its dup; our listener stays open
        self.accepting = {}

    async def _serve_inprocess(self, live: list[int]) -> None:
        loop = asyncio.get_running_loop()
        if self.engine is None:
            configure_logging(False)
            self.engine = Engine(self.identity, loop)
        await self.engine.prepare([self.groups[i] for i in live])
        for i in live:
            listener = self.listeners[i]
            if listener is not None and i not in self.accepting:
                self.accepting[i] = self.engine.serve(self.groups[i], listener.dup())
        if not self.serving_said:
            say("the xdg-containers service is not back yet; serving in this process "
                "meanwhile")
            self.serving_said = True

    # -- settling ---------------------------------------------------------------------------

    def _settled(self) -> bool:
        """Every group with the service and nothing served here any more."""
        if self.bus is None or self.closed or self.lost or self.accepting or self.retired:
            return False
        if self.engine is not None and len(self.engine.registry):
            return False
        return all(i in self.connectors for i in self._live())

    def _hand_to_front(self) -> None:
        assert self.bus is not None and self.front_exe is not None and self._loop is not None
        self._loop.remove_reader(self.bus.fileno())
        for conn in self.connectors.values():
            self._loop.remove_reader(conn.fileno())
        if self.sync_fd is not None:
            self._loop.remove_reader(self.sync_fd)
        self.watch.close()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        n = len(self.groups)
        connectors = [self.connectors[i].fileno() if i in self.connectors else -1
                      for i in range(n)]
        listeners = [sock.fileno() if sock is not None else -1 for sock in self.listeners]
        exec_anchor_loop(self.front_exe, self.sync_fd, self.bus.fileno(), connectors,
                         listeners, [g.path for g in self.groups], self.args,
                         self.service_name)
        # The exec failed (said on stderr): this loop serves on.
        self.front_exe = None
        self._watch_registration()
        if self.sync_fd is not None:
            self._loop.add_reader(self.sync_fd, self._done.set)

    def _close(self) -> None:
        self.watch.close()
        if self.engine is not None:
            self.engine.close()
        if self._loop is not None:
            self._retire_registration()
            self._close_retired()
        # The listening sockets stay open: the process exits next (main.py unlinks their
        # paths), or, after a fault of ours, serves them in-process.


def recover(
    bus_address: str,
    groups: Sequence[Group],
    identity: Identity,
    listeners: Sequence[socket.socket | None],
    registration: tuple[socket.socket, dict[int, socket.socket], str],
    sync_fd: int | None,
    front_exe: str | None,
    args: Sequence[str],
) -> int:
    """Run ``Recovery`` on the service's event loop; the drop-in's exit status."""
    from xdg_containers.io.dispatch import new_event_loop

    async def main() -> int:
        rec = Recovery(bus_address, groups, identity, listeners, sync_fd, front_exe, args)
        rec.adopt(*registration)
        return await rec.run()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main())
