"""One confined connection: the client socket, its own connection to the real bus, the pumps.

Life of a session: answer the client's first handshake line ourselves
(server-side SASL), then take a spare bus connection (spare.py) or open one,
whose handshake (client-side SASL) is pipelined behind the client's: BEGIN and
the Hello follow our AUTH without waiting for the bus's OK. Then forward whole
messages each way, judged by the server's filter. The client's Hello goes
through, so it keeps its own unique name on the bus; nothing after Hello is
forwarded until the bus has answered it, so the name is known before any peer
can ask about it.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import socket
import struct
import termios
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from ..anchor.link import AnchorError, AnchorLink
from ..sasl.client import SaslClient
from ..sasl.server import SaslError, SaslServer
from ..wire.address import AddressError, parse_address
from ..wire.build import bus_call, error_reply, method_return
from ..wire.framing import MessageReader
from ..wire.header import (
    ERROR,
    METHOD_CALL,
    METHOD_RETURN,
    SIGNAL,
    Header,
    MessageError,
    Raw,
    parse_header,
)
from ..wire.names import shorten
from ..wire.types import SignatureError, read_string
from .budget import CHUNK
from .decision import BUS_NAME, Decision, Verdict
from .endpoint import ConnectError, Endpoint, close_fds, connect_address, connect_unix_now
from .fastpath import scan_calls, scan_replies
from .peercred import PeerCredentials
from .pending import PendingCalls

if TYPE_CHECKING:
    from ..policy import Policy
    from ..servers.server import ContainerServer

log = logging.getLogger(__name__)

#: Send buffer asked for on our connections to the bus (see _bus_connected).
BUS_SNDBUF = 1024 * 1024
#: After a client half-closes, replies it still waits for are delivered for this long.
HALF_CLOSE_GRACE = 25.0
_TYPE_NAMES = {METHOD_CALL: "call", METHOD_RETURN: "return", ERROR: "error", SIGNAL: "signal"}


@functools.lru_cache(maxsize=64)
def _unix_sockaddr(bus_address: str) -> str | bytes | None:
    """The socket address of the bus's first entry when it is a unix socket, else None."""
    try:
        family, addr = parse_address(bus_address)[0].sockaddr()
    except AddressError:
        return None
    if family != socket.AF_UNIX or isinstance(addr, tuple):
        return None
    return addr


class MessageFilter(Protocol):
    """Judges each message of one session; see ``decision.py`` for the verdicts."""

    def from_client(self, hdr: Header, data: Raw) -> Decision | None:
        """Client -> bus. None means pass unchanged."""

    def from_bus(self, hdr: Header, data: Raw) -> Decision | None:
        """Bus -> client. None means pass unchanged."""

    def hello_sent(self) -> list[bytes]:
        """The client's Hello goes to the bus now; return messages to send right after it."""

    def hello_done(self, unique_name: str) -> list[bytes]:
        """The client's unique name is known; return messages to send to the bus."""

    def unexpected_reply(self, hdr: Header) -> Decision | None:
        """Bus -> client: a reply that answers no outstanding call of the client."""

    # The fast path (fastpath.py): decisions the filter has cached.
    @property
    def call_passes(self) -> Mapping[bytes, str]:
        """Header-field arrays of client calls known to pass -> their destination."""

    def fast_reply(self, reply_serial: int, sender: str) -> None:
        """A peer's reply answering a call of the client (the session matched it) passes
        by the fast path: do the bookkeeping ``from_bus`` would."""


class Session:
    """A proxied connection from one confined client to the real bus."""

    def __init__(
        self,
        server: ContainerServer,
        sock: socket.socket,
        creds: PeerCredentials,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Take ownership of an accepted, credential-checked socket."""
        self.server = server
        self.creds = creds
        self.loop = loop
        self.unique_name: str | None = None
        self.closed = False
        self.filter: MessageFilter = server.make_filter(self)
        limits = server.limits
        self._max_pending = limits.max_pending_bytes_per_connection
        # No attribute more without need: measured with callgrind, two more made every
        # round trip 3% dearer (CPython 3.11's attribute fast path). The fd limit lives
        # in the client reader (max_fds), and "counted by the budget" is the client
        # endpoint's on_written hook being set.
        self._client = Endpoint(loop, sock, self._client_data, self._client_error, self._client_eof)
        self._client.on_filled = self._client_filled
        self._bus: Endpoint | None = None
        self._sasl = SaslServer(creds.uid, server.guid, unix_fd_possible=True)
        self._sasl_client = SaslClient(os.getuid())
        self._client_reader = MessageReader(
            limits.max_message_bytes, limits.max_fds_per_connection
        )
        self._bus_reader = MessageReader(limits.max_message_bytes)
        self._client_began = False  # the client's handshake is over
        self._bus_began = False  # ours with the bus is over (cached: done is a property)
        self._hello_serial: int | None = None
        # Client messages wait: until the client began and we have a bus connection,
        # while its Hello is unanswered, and while fds wait for AGREE_UNIX_FD.
        self._hold_client = True
        self._release_client = False  # Hello answered: pump the client after this chunk
        # The client's calls awaiting replies, by (peer, serial); a denied call's
        # entry holds the answer that replaces the reply to its Ping.
        self._calls = PendingCalls()
        self._error_serial = 0
        self._closing_after_flush = False
        self._timers: list[asyncio.TimerHandle] = []
        self._connect_task: asyncio.Task[None] | None = None
        self._spare_addr: str | bytes | None = None  # the bus socket, for spares.py
        # With a spare taken: what went to the bus after BEGIN until the Hello's answer
        # (to send again should the bus drop the spare); None otherwise.
        self._spare_replay: list[bytes] | None = None
        self._replay_on_connect: list[bytes] | None = None
        self._stalled: tuple[bytes | bytearray, Header, list[int] | None] | None = None

    # -- start and stop ----------------------------------------------------------------

    def start(self) -> None:
        """Answer the client's opening lines, then connect to the bus.

        The client first: its AUTH is usually waiting already, and our own
        handshake with the bus is pipelined (BEGIN and Hello need not wait for
        the bus's OK), so the bus's side stays off the client's path.
        """
        self._client.start_reading()
        self.server.handshake_started(self)
        self._client.read_now()
        if self.closed:
            return
        if not self._connect_bus_now():
            self._connect_task = self.loop.create_task(self._connect_bus())

    def partial_expired(self) -> None:
        """The idle partial message timeout passed since the client's unfinished message
        was last seen: close if it made no progress that was the client's to make."""
        if self.closed:
            return
        reader = self._client_reader
        if not reader.buffered:
            return  # finished meanwhile
        if reader.progress != reader.mark or self._waiting_for_us():
            reader.mark = reader.progress
            self.server.partials.add(self)
            return
        self.close(
            f"a message of {reader.buffered + reader.wanted()} bytes was left unfinished "
            f"({reader.buffered} bytes and no more for idle_partial_message_timeout="
            f"{self.server.limits.idle_partial_message_timeout} ms)"
        )

    def _waiting_for_us(self) -> bool:
        """The client's message is stuck on our side: we hold it (the Hello's answer
        is awaited, a whole message waits) or stopped reading while it has sent more."""
        if self._hold_client or self._stalled is not None or self._client_reader.has_message():
            return True
        if self._client.reading:
            return False
        try:
            waiting = struct.unpack(
                "i", fcntl.ioctl(self._client.fd, termios.FIONREAD, b"\0\0\0\0")
            )[0]
        except OSError:
            return False
        return bool(waiting)

    def budget_resume(self) -> None:
        """The service-wide budget lets this connection's client be read again."""
        if self.closed or self._client.eof:
            return
        bus = self._bus
        if bus is not None and (
            bus.pending_bytes > self._max_pending or bus.pending_fds > self._client_reader.max_fds
        ):
            return  # the bus lags: _bus_drained resumes it
        self._resume_client()

    def _account(self) -> bool:
        """Tell the service-wide budget what this connection holds (it counts whole MiB
        only); stop reading the client when the budget says so. True if stopped."""
        held = self._client_reader.allocated + self._client.pending_bytes
        bus = self._bus
        if bus is not None:
            held += bus.pending_bytes
        budget = self.server.budget
        stop = budget.set_held(self, held)
        holder = held >= CHUNK
        if holder != (self._client.on_written is not None):
            # While counted, every write may shrink what is held: recount then.
            hook = self._queue_written if holder else None
            self._client.on_written = hook
            if bus is not None:
                bus.on_written = hook
        if stop and not self._client_reader.filling:
            # (Filling a reserved buffer costs nothing more and frees it when done.)
            self._budget_stop()
            return True
        return False

    def _budget_stop(self) -> None:
        self.server.budget.paused(self)
        self._client.pause_reading()

    def _queue_written(self) -> None:
        if not self.closed:
            self._account()

    def _client_partial(self, reader: MessageReader) -> None:
        """After the general path on the client side: a message left unfinished starts
        its idle deadline, counts in the budget, and may have the next read go straight
        into its buffer. Costs nothing once no message is left unfinished."""
        if self.closed:
            return
        if not reader.buffered:
            if self._client.on_written is not None:
                self._account()
            return
        partials = self.server.partials
        if self not in partials:
            reader.mark = reader.progress
            partials.add(self)
        if reader.allocated >= CHUNK or self._client.on_written is not None:
            if self._account():
                return
            need = reader.reservation()
            # (All of it: the old buffer lives on while its bytes are copied over.)
            if need and not self.server.budget.may_grow(self, need):
                self._budget_stop()  # before the memory is committed, not after
                return
            self._client.into = reader.read_target()
            if need:
                self._account()  # the whole buffer is reserved now
            return
        self._client.into = reader.read_target()

    def handshake_expired(self) -> None:
        """The auth timeout passed before the client's Hello went to the bus: drop it."""
        if not self.closed:
            self.close("handshake not finished in time")

    def close(self, reason: str | None = None) -> None:
        """Tear the session down: both sockets, held fds, the pidfd; tell the server."""
        if self.closed:
            return
        self.closed = True
        if reason:
            # A fault of ours: once, at error level, with its traceback.
            fault = self._client.fault or (self._bus.fault if self._bus is not None else None)
            log.log(
                logging.ERROR if fault is not None else logging.INFO,
                "%s: closing connection of pid %d (%s): %s",
                self.server.path,
                self.creds.pid,
                self.unique_name or "no unique name yet",
                shorten(reason, 800),
                exc_info=fault,
            )
        if self._client.on_written is not None:
            self._client.on_written = None
            self.server.budget.release(self)
        for t in self._timers:
            t.cancel()
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        self._client.close()
        if self._bus is not None:
            self._bus.close()
        self._client_reader.close()
        self._bus_reader.close()
        if self._stalled is not None and self._stalled[2]:
            close_fds(self._stalled[2])
        self.creds.close()
        self.server.session_closed(self)
        if self._spare_addr is not None:
            self.server.spares.session_ended(self._spare_addr, self.server.anchor)

    def close_when_flushed(self) -> None:
        """Close once everything queued toward the client has been written."""
        if self._client.write_idle:
            self.close()
        else:
            self._closing_after_flush = True
            self._client.on_drained = self._client_drained
            self._client.flush()

    def update_policy(self, policy: Policy | None) -> bool:
        """Give the current filter a new policy if it can take one; False if it cannot."""
        update = getattr(self.filter, "update_policy", None)
        if update is None:
            return False
        self._inject(update(policy))
        return True

    def replace_filter(self, new_filter: MessageFilter) -> None:
        """Swap the filter (SetPolicy); the new one learns the unique name if known."""
        self.filter = new_filter
        if self.unique_name is not None:
            self._inject(new_filter.hello_done(self.unique_name))

    # -- the bus side ------------------------------------------------------------------

    def _connect_bus_now(self) -> bool:
        """Take a spare bus connection, or ask for one; False: the connect task must.

        A server's connections are made by its anchor (SPEC 10), so that the bus
        records the anchor's pid, never ours; only a server with no anchor (this
        process is the anchor: the in-process drop-in) connects here itself.
        """
        addr = _unix_sockaddr(self.server.bus_address)
        if addr is None:
            return False
        self._spare_addr = addr
        spare = self.server.spares.take(addr, self.server.anchor)
        if spare is not None:
            sock, self._sasl_client = spare  # its AUTH went out already
            self._spare_replay = []
            self._bus_connected(sock, auth_sent=True)
            return True
        return self._connect_fresh(addr)

    def _connect_fresh(self, addr: str | bytes) -> bool:
        anchor = self.server.anchor
        if anchor is not None:
            self._connect_task = self.loop.create_task(self._connect_bus(anchor))
            return True
        try:
            sock = connect_unix_now(addr)
        except OSError:
            return False  # the caller falls back to the connect task
        self._bus_connected(sock)
        return True

    async def _connect_bus(self, anchor: AnchorLink | None = None) -> None:
        """A bus connection that takes waiting: the anchor's answer, or (no anchor, or a
        bus that is not a unix socket: no pid travels) our own connect."""
        try:
            if anchor is not None:
                sock = await anchor.connect()
            else:
                sock = await connect_address(self.loop, self.server.bus_address)
        except AnchorError as exc:
            self.close(f"no bus connection: {exc}")
            return
        except ConnectError as exc:
            self.close(str(exc))
            return
        if self.closed:
            sock.close()
            return
        self._bus_connected(sock)

    def _bus_connected(self, sock: socket.socket, auth_sent: bool = False) -> None:
        unix = sock.family == socket.AF_UNIX
        if unix:
            # The bus reads promptly: a larger send buffer lets a large message go in
            # one or two writes instead of a wake-up per 200 KiB. (Capped by the
            # kernel's wmem_max; the client side keeps the default, so a client that
            # does not read cannot make us hold more kernel memory.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUS_SNDBUF)
        self._bus = Endpoint(self.loop, sock, self._bus_data, self._bus_error, self._bus_eof)
        self._bus.on_filled = self._bus_filled
        self._bus.receive_fds = unix
        opening = b"" if auth_sent else self._sasl_client.start()
        if not self._client_began:
            if opening:
                self._bus.send(opening)
            self._bus.start_reading()
            return
        # The client finished its handshake first (pipelined, or the connect took a
        # task): its messages, Hello first, may follow our BEGIN at once.
        self._bus.queue(opening + self._sasl_client.begin(self._sasl.negotiated_unix_fd))
        replay, self._replay_on_connect = self._replay_on_connect, None
        for m in replay or ():
            self._bus.queue(m)
        self._bus.start_reading()
        if self._hello_serial is None:
            self._hold_client = False
        self._pump_client()
        self._bus.flush()
        if self._client.eof:
            self._finish_after_eof()

    def _bus_error(self, reason: str) -> None:
        if self._bus is not None and self._bus.fault is not None:
            self.close(f"bus connection: {reason}")  # a fault of ours: no second try
            return
        if not self._retry_without_spare():
            self.close(f"bus connection: {reason}")

    def _bus_eof(self) -> None:
        if self._retry_without_spare():
            return
        log.debug("%s: bus closed the connection of %s", self.server.path, self.unique_name)
        self._client_reader.close()
        self.close_when_flushed()

    def _retry_without_spare(self) -> bool:
        """The bus closed a spare connection (spare.py) before sending us any message, as
        a bus whose auth_timeout is shorter than the spare's age does: start again on a
        fresh connection with the same bytes. Only while nothing but the Hello (and the
        filter's subscriptions) went after BEGIN and nothing but handshake lines came
        back, so nothing the client sent is lost, doubled or answered twice."""
        replay = self._spare_replay
        if replay is None or self._spare_addr is None or self.closed:
            return False
        self._spare_replay = None  # once only
        log.info(
            "%s: the bus closed a spare connection under the client of pid %d; "
            "starting again on a fresh one", self.server.path, self.creds.pid,
        )
        assert self._bus is not None
        self._bus.close()
        self._bus = None
        self._bus_reader.close()
        self._bus_reader = MessageReader(self.server.limits.max_message_bytes)
        self._sasl_client = SaslClient(os.getuid())
        self._bus_began = False
        self._replay_on_connect = replay
        if not self._connect_fresh(self._spare_addr):
            self._connect_task = self.loop.create_task(self._connect_bus())
        if not self._client.reading and not self._client.eof and not self.closed:
            self._client.start_reading()  # paused for the old connection's backlog
        return True

    def _bus_data(self, data: bytes, fds: list[int]) -> None:
        if self.closed:
            close_fds(fds)
            return
        if not self._bus_began and not self._sasl_client.done:
            close_fds(fds)
            try:
                self._sasl_client.feed(data)
            except SaslError as exc:
                self.close(f"bus handshake failed: {exc}")
                return
            if not self._sasl_client.done:
                return  # fd-less messages went already (pipelined); fds wait for done
            if self._sasl.negotiated_unix_fd and not self._sasl_client.unix_fd_agreed:
                self.close("the bus refused unix fd passing that the client negotiated")
                return
            data = self._sasl_client.leftover
            self._bus_began = True
            if self._hold_client and self._hello_serial is None:
                self._hold_client = False
            self._pump_client()
            if not data:
                return
        self._bus_began = True
        self._spare_replay = None  # the bus sent a message: no starting again from here
        reader = self._bus_reader
        try:
            if not fds:
                if reader.buffered:
                    data = self._complete_partial(reader, data, self._pump_bus)
                    if self.closed:
                        return
                if data and not reader.buffered:
                    data = self._fast_bus(data)
                    if not data:
                        return
            reader.feed(data, fds)
            self._pump_bus()
        except (MessageError, SignatureError) as exc:
            self.close(f"malformed message from the bus: {exc}")
            return
        self._aim(self._bus, reader)

    def _bus_filled(self, nbytes: int, fds: list[int]) -> None:
        """A read straight into a large message's buffer (MessageReader.read_target)."""
        if self.closed:
            close_fds(fds)
            return
        reader = self._bus_reader
        try:
            into = reader.filled(nbytes, fds)
            if into is not None and self._bus is not None:
                self._bus.into = into  # more of the same message to come
                return
            self._pump_bus()
        except (MessageError, SignatureError) as exc:
            self.close(f"malformed message from the bus: {exc}")
            return
        self._aim(self._bus, reader)

    def _aim(self, endpoint: Endpoint | None, reader: MessageReader) -> None:
        """After the general path: let the next read of ``endpoint`` go straight into
        the buffer of a large message ``reader`` holds a part of (if it does)."""
        if reader.buffered and endpoint is not None and not self.closed:
            endpoint.into = reader.read_target()

    def _complete_partial(
        self, reader: MessageReader, data: bytes, pump: Callable[[], None]
    ) -> bytes:
        """Finish the message the reader holds a part of through the general path;
        return the rest of ``data``, which then starts at a message boundary."""
        wanted = reader.wanted()
        if wanted <= 0 or wanted >= len(data):
            return data
        reader.feed(memoryview(data)[:wanted])
        pump()
        return data[wanted:]

    def _fast_bus(self, data: bytes) -> bytes:
        """Forward the leading peer replies the filter passes; return the rest of ``data``."""
        if self._hello_serial is not None or self.server.spec.log_messages:
            return data
        found = scan_replies(data, self._bus_reader.max_message_bytes)
        if not found:
            return data
        fast_reply = self.filter.fast_reply
        answered = self._calls.answered
        pos = count = 0
        for end, rs, sender in found:
            # (A peer's reply never answers a denied call's Ping: that went to the driver.)
            if answered(sender, rs, False) is None:
                break
            fast_reply(rs, sender)
            pos = end
            count += 1
        if not pos:
            return data
        client = self._client
        client.send(data if pos == len(data) else memoryview(data)[:pos])
        self.server.messages_forwarded += count
        if pos < len(data):
            return data[pos:]
        self._forwarded_to_client()
        return b""

    def _pump_bus(self) -> None:
        reader = self._bus_reader
        client = self._client
        server = self.server
        forwarded = 0
        log_all = server.log_messages
        while not self.closed:
            item = reader.next_message()
            if item is None:
                break
            data = item[0]
            hdr = parse_header(data)
            fds = reader.take_fds(hdr.unix_fds) if hdr.unix_fds else None
            rs = hdr.reply_serial
            decision: Decision | None
            if rs is not None and hdr.message_type in (METHOD_RETURN, ERROR):
                if rs == self._hello_serial and hdr.sender == BUS_NAME:
                    self._calls.answered(BUS_NAME, rs, hdr.message_type == ERROR)
                    forwarded += self._hello_reply(hdr, data, fds)
                    continue
                entry = self._calls.answered(hdr.sender, rs, hdr.message_type == ERROR)
                if entry is None:
                    decision = self.filter.unexpected_reply(hdr)
                elif entry[1] is not None:
                    # The answer to a denied call's Ping: the denial goes instead.
                    denied = entry[1]
                    if fds:
                        close_fds(fds)
                    self._error_serial = (self._error_serial % 0x7FFFFFFF) + 1
                    if denied.verdict is Verdict.ANSWER:
                        data = method_return(
                            self._error_serial, rs, BUS_NAME, self.unique_name,
                            denied.reply_signature, denied.data,
                        )
                    else:
                        data = error_reply(
                            self._error_serial, rs, self.unique_name,
                            denied.error_name, denied.text,
                        )
                    client.queue(data)
                    continue
                else:
                    decision = self.filter.from_bus(hdr, data)
            else:
                decision = self.filter.from_bus(hdr, data)
            if decision is not None:
                if decision.verdict is Verdict.REPLACE:
                    data = decision.data
                else:
                    if fds:
                        close_fds(fds)
                    server.count_denied()
                    self._log_message("in", hdr, decision)
                    continue
            forwarded += 1
            if log_all:
                self._log_message("in", hdr, None)
            client.queue(data, fds)
        server.messages_forwarded += forwarded
        if self.closed:
            return
        reader.check_no_stray_fds()
        client.flush()
        self._forwarded_to_client()
        if self._release_client:
            self._release_client = False
            self._pump_client()

    def _forwarded_to_client(self) -> None:
        """Backpressure (stop reading the bus while the client lags) and half-close."""
        client = self._client
        pending = client.pending_bytes
        if pending:  # (nothing queued, the usual case: nothing to check)
            if (
                pending > self._max_pending or client.pending_fds > self._client_reader.max_fds
            ) and self._bus is not None:
                self._bus.pause_reading()
                client.on_drained = self._client_drained
            if pending >= CHUNK or client.on_written is not None:
                self._account()
        if client.eof:
            self._finish_after_eof()

    def _client_drained(self) -> None:
        if self._closing_after_flush:
            if self._client.write_idle:
                self.close()
            return
        bus = self._bus
        if bus is not None and not bus.reading and not bus.eof and (
            self._client.pending_bytes <= self._max_pending // 2
            and self._client.pending_fds <= self._client_reader.max_fds // 2
        ):
            self._client.on_drained = None
            bus.start_reading()

    def _hello_reply(self, hdr: Header, data: Raw, fds: list[int] | None) -> int:
        """The bus answered the client's Hello: pass the answer on at once (what the
        client waits for before its first call), then learn the name before anything
        after it is judged. No peer's question is served in between: the service's
        own calls wait for this callback to return. Returns 1 (it is forwarded).

        The filter sees it for its bookkeeping, but the bus's answer to the client's own
        Hello always goes through: a filter swapped in by SetPolicy while the Hello was
        on its way never saw the call, and would drop its answer (found in review)."""
        decision = self.filter.from_bus(hdr, data)
        out = data
        if decision is not None and decision.verdict is Verdict.REPLACE:
            out = decision.data
        if fds:
            close_fds(fds)  # the driver sends none; a reply carrying some loses them
        if self.server.log_messages:
            self._log_message("in", hdr, None)
        self._client.queue(out)
        self._client.flush()  # may find the client gone and close the session
        self._hello_answered(hdr, data)
        return 1

    def _hello_answered(self, hdr: Header, data: Raw) -> None:
        if self.closed:
            return  # never register the name of a session that already ended
        self._hello_serial = None
        if hdr.message_type == METHOD_RETURN and hdr.signature == "s":
            try:
                name = read_string(data, hdr.body_offset, hdr.little_endian)[0]
            except SignatureError:
                name = ""
            if name.startswith(":"):
                self.unique_name = name
                self._inject(self.filter.hello_done(name))
                self.server.session_named(self)
        self._hold_client = False
        # Messages the client sent after its Hello go once this chunk is done.
        self._release_client = True

    def _inject(self, messages: list[bytes]) -> None:
        """Send the proxy's own messages to the bus (never expecting replies)."""
        if messages and self._spare_replay is not None:
            self._spare_replay += messages
        if messages and self._bus is not None:
            for m in messages:
                self._bus.queue(m)
            self._bus.flush()

    # -- the client side ---------------------------------------------------------------

    def _client_error(self, reason: str) -> None:
        self.close(f"client connection: {reason}")

    def _client_eof(self) -> None:
        # Half-closed: what the client sent still goes out, and the replies it waits
        # for still come back, for up to HALF_CLOSE_GRACE seconds.
        self._finish_after_eof()
        if not self.closed and not self._closing_after_flush:
            self._timers.append(self.loop.call_later(HALF_CLOSE_GRACE, self.close_when_flushed))

    def _finish_after_eof(self) -> None:
        """After client EOF: close once nothing it sent is unsent and nothing is owed to it."""
        if self.closed or not self._client.eof:
            return
        if self._bus is None and self._sasl.done and self._connect_task is not None:
            return  # the anchor's connection is on its way: _bus_connected comes back here
        if self._bus is None or self._bus.closed or not self._sasl.done:
            # Nothing can reach the bus any more (or the client left mid-handshake).
            self.close_when_flushed()
            return
        if self._hold_client or self._stalled is not None or self._client_reader.has_message():
            return  # its messages are still on their way to the bus
        # (A partial message left in the reader can never complete now.)
        if self._calls:
            return
        self.close_when_flushed()

    def _client_data(self, data: bytes, fds: list[int]) -> None:
        if self.closed:
            close_fds(fds)
            return
        if not self._client_began:
            if fds:
                close_fds(fds)
                self.close("unix fds sent during the handshake")
                return
            try:
                reply = self._sasl.feed(data)
            except SaslError as exc:
                self.close(f"client handshake failed: {exc}")
                return
            if reply:
                self._client.send(reply)
            if not self._sasl.done:
                return
            self._client_began = True
            self._client.receive_fds = self._sasl.negotiated_unix_fd
            bus = self._bus
            if bus is not None:
                # Queued, not sent: the pump below writes these lines and the first
                # messages (Hello) in one write. Our handshake is pipelined: fd-less
                # messages may follow BEGIN whether or not the bus said OK yet.
                bus.queue(self._sasl_client.begin(self._sasl.negotiated_unix_fd))
                self._hold_client = False
            data = self._sasl.leftover
            if not data or self._hold_client:
                if bus is not None:
                    bus.flush()
                if not data:
                    return
        reader = self._client_reader
        try:
            if not fds:
                if reader.buffered:
                    data = self._complete_partial(reader, data, self._pump_client)
                    if self.closed:
                        return
                if data and not self._hold_client and not reader.buffered:
                    data = self._fast_client(data)
                    if not data:
                        return
            reader.feed(data, fds)
        except MessageError as exc:
            self.close(f"malformed data from the client: {exc}")
            return
        self._pump_client()
        self._client_partial(reader)

    def _client_filled(self, nbytes: int, fds: list[int]) -> None:
        """A read straight into a large message's buffer (MessageReader.read_target)."""
        if self.closed:
            close_fds(fds)
            return
        reader = self._client_reader
        try:
            into = reader.filled(nbytes, fds)
        except MessageError as exc:
            self.close(f"malformed data from the client: {exc}")
            return
        if into is not None:
            self._client.into = into  # more of the same message to come
            return
        self._pump_client()
        self._client_partial(reader)

    def _fast_client(self, data: bytes) -> bytes:
        """Forward the leading calls the filter has passed before; return the rest of ``data``."""
        passes = self.filter.call_passes
        bus = self._bus
        if not passes or bus is None or self._stalled is not None or self.server.spec.log_messages:
            return data
        pos, count, owed = scan_calls(data, self._client_reader.max_message_bytes, passes)
        if not pos:
            return data
        self._spare_replay = None  # more than the Hello goes: no starting again
        # Send first: the bookkeeping below is off the round trip's critical path
        # (no reply can be handled before this callback returns).
        bus.send(data if pos == len(data) else memoryview(data)[:pos])
        sent = self._calls.sent
        for serial, dest in owed:
            sent(serial, dest)
        self.server.messages_forwarded += count
        if pos < len(data):
            return data[pos:]
        self._forwarded_to_bus(bus)
        return b""

    def _pump_client(self) -> None:
        if self._hold_client or self.closed:
            return
        bus = self._bus
        assert bus is not None
        reader = self._client_reader
        server = self.server
        forwarded = 0
        log_all = server.log_messages
        try:
            while not self._hold_client:
                stalled = self._stalled
                if stalled is not None:
                    if not self._sasl_client.done:
                        self._hold_client = True
                        break
                    self._stalled = None
                    data, hdr, fds = stalled
                else:
                    item = reader.next_message()
                    if item is None:
                        reader.check_no_stray_fds()
                        break
                    data = item[0]
                    hdr = parse_header(data)
                    fds = reader.take_fds(hdr.unix_fds) if hdr.unix_fds else None
                    if fds and not self._sasl_client.done:
                        # Fds may only go once the bus agreed to fd passing.
                        self._stalled = (data, hdr, fds)
                        self._hold_client = True
                        break
                if fds and not self._sasl.negotiated_unix_fd:
                    close_fds(fds)
                    self.close("unix fds sent without negotiating them")
                    return
                decision = self.filter.from_client(hdr, data)
                if decision is not None:
                    if fds:
                        close_fds(fds)
                    server.count_denied()
                    self._log_message("out", hdr, decision)
                    if decision.verdict in (Verdict.DENY, Verdict.ANSWER) and hdr.expects_reply:
                        # Replace the call by a Ping with the client's own serial;
                        # its reply is swapped for our answer, so order holds. (Not
                        # when 64 calls with this serial are unanswered: no answer.)
                        if self._calls.sent(hdr.serial, BUS_NAME, decision):
                            bus.queue(bus_call(hdr.serial, "Ping", "org.freedesktop.DBus.Peer"))
                    elif decision.verdict is Verdict.REPLACE:
                        bus.queue(decision.data)
                    self._spare_replay = None  # more than the Hello went: no starting again
                    continue
                if hdr.message_type == METHOD_CALL:
                    if hdr.expects_reply:
                        self._calls.sent(hdr.serial, hdr.destination or "")
                    if hdr.member == "Hello" and self.unique_name is None and (
                        hdr.destination == BUS_NAME
                    ):
                        self._hello_serial = hdr.serial
                        self._hold_client = True
                        server.handshake_done(self)
                        forwarded += 1
                        if log_all:
                            self._log_message("out", hdr, None)
                        bus.queue(data, fds)
                        # The filter's own subscriptions go in the same write, right
                        # after the Hello (the bus takes nothing before it).
                        extra = self.filter.hello_sent()
                        for m in extra:
                            bus.queue(m)
                        if self._spare_replay is not None:
                            if fds:
                                self._spare_replay = None  # fds cannot be sent twice
                            else:
                                self._spare_replay += [bytes(data), *extra]
                        continue
                forwarded += 1
                if log_all:
                    self._log_message("out", hdr, None)
                bus.queue(data, fds)
                self._spare_replay = None  # more than the Hello went: no starting again
        except (MessageError, SignatureError) as exc:
            server.messages_forwarded += forwarded
            bus.flush()
            self.close(f"malformed message from the client: {exc}")
            return
        server.messages_forwarded += forwarded
        bus.flush()
        if not self.creds.completed:
            # Off the client's path: the bus is busy with its Hello now.
            self.creds.complete(self._client.sock)
        self._forwarded_to_bus(bus)

    def _forwarded_to_bus(self, bus: Endpoint) -> None:
        """Half-close, and backpressure (stop reading the client while the bus lags)."""
        if self._client.eof:
            self._finish_after_eof()
        pending = bus.pending_bytes
        if pending:  # (nothing queued, the usual case: nothing to check)
            if pending > self._max_pending or bus.pending_fds > self._client_reader.max_fds:
                self._client.pause_reading()
                bus.on_drained = self._bus_drained
            if pending >= CHUNK or self._client.on_written is not None:
                self._account()

    def _bus_drained(self) -> None:
        bus = self._bus
        if bus is None or (
            bus.pending_bytes > self._max_pending // 2
            or bus.pending_fds > self._client_reader.max_fds // 2
        ):
            return
        bus.on_drained = None
        if not self._client.eof and not self.closed and not self.server.budget.is_paused(self):
            self._resume_client()

    def _resume_client(self) -> None:
        """Read the client again after we paused it. Its idle-partial-message deadline
        starts over: the time it waited was ours (a deadline due in the same loop turn
        would otherwise find it reading, no progress made, and close it)."""
        self._client_reader.mark = -1
        self._client.start_reading()

    # -- logging -------------------------------------------------------------------------

    def _log_message(self, direction: str, hdr: Header, decision: Decision | None) -> None:
        verdict = "pass" if decision is None else decision.verdict.name.lower()
        if decision is not None:
            self.server.log_denial(self, direction, hdr, verdict, decision.reason)
        if not self.server.log_messages:
            return
        log.info(
            "%s %s dir=%s type=%s serial=%d reply_serial=%s sender=%s dest=%s path=%s "
            "interface=%s member=%s verdict=%s%s",
            self.server.path,
            self.unique_name or "-",
            "C->B" if direction == "out" else "B->C",
            _TYPE_NAMES.get(hdr.message_type, "?"),
            hdr.serial,
            hdr.reply_serial if hdr.reply_serial is not None else "-",
            shorten(hdr.sender or "-"),
            shorten(hdr.destination or "-"),
            shorten(hdr.path or "-"),
            shorten(hdr.interface or "-"),
            shorten(hdr.member or hdr.error_name or "-"),
            verdict,
            f' reason="{shorten(decision.reason, 800)}"'
            if decision is not None and decision.reason
            else "",
        )
