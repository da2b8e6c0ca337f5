"""A session's state and its ends: budget, timers' events, half-close, closing, logging.

The base of ``SessionCore`` (core/session.py): the bus side (bus_side.py) and the
client side (session.py) build on it. The driver (proxy/session.py) fills in the
few hooks that need I/O: ``_stop_io``, ``_start_grace``, ``_client_unread``,
``_complete_creds``, ``_reconnect`` and ``_bus_on_its_way``.
"""

from __future__ import annotations

import logging

from ..policy import Policy
from ..sasl.client import SaslClient
from ..sasl.server import SaslServer
from ..wire.framing import MessageReader
from ..wire.header import ERROR, METHOD_CALL, METHOD_RETURN, SIGNAL, Header
from ..wire.names import shorten
from .budget import CHUNK
from .decision import Decision
from .fds import close_fds
from .pending import PendingCalls
from .phase import BusPhase, Phase
from .ports import Credentials, MessageFilter, Port, SessionHost

# (The name the session logged under before the core was split out: log filters keep working.)
log = logging.getLogger("xdg_containers.proxy.session")

_TYPE_NAMES = {METHOD_CALL: "call", METHOD_RETURN: "return", ERROR: "error", SIGNAL: "signal"}
_AUTH = Phase.AUTH


class SessionState:
    """What one proxied connection holds, and how it ends."""

    # Slots: the hot path reads these on every message, and CPython 3.11 makes every
    # attribute of an object with many dict attributes dearer (measured: +3% per round
    # trip for two more). The fd limit lives in the client reader (max_fds), and
    # "counted by the budget" is the client port's on_written hook being set.
    __slots__ = (
        "__weakref__",
        "_bus",
        "_bus_began",
        "_bus_reader",
        "_calls",
        "_client",
        "_client_reader",
        "_error_serial",
        "_hello_serial",
        "_hold_client",
        "_max_pending",
        "_release_client",
        "_replay_on_connect",
        "_sasl",
        "_sasl_client",
        "_spare_addr",
        "_spare_replay",
        "_stalled",
        "closed",
        "creds",
        "draining",
        "filter",
        "phase",
        "server",
        "unique_name",
    )

    def __init__(
        self, server: SessionHost, creds: Credentials, client: Port, bus_uid: int
    ) -> None:
        """A session whose client is connected and whose bus connection is to come."""
        self.server = server
        self.creds = creds
        self.unique_name: str | None = None
        self.closed = False
        self.phase = _AUTH
        self.draining = False  # close once everything owed to the client is written
        self.filter: MessageFilter = server.make_filter(self)
        limits = server.limits
        self._max_pending = limits.max_pending_bytes_per_connection
        self._client = client
        self._bus: Port | None = None
        self._sasl = SaslServer(creds.uid, server.guid, unix_fd_possible=True)
        self._sasl_client = SaslClient(bus_uid)
        self._client_reader = MessageReader(
            limits.max_message_bytes, limits.max_fds_per_connection
        )
        self._bus_reader = MessageReader(limits.max_message_bytes)
        self._bus_began = False  # our handshake with the bus is over (cached: done is a property)
        self._hello_serial: int | None = None
        # Client messages wait: until the client began and we have a bus connection,
        # while its Hello is unanswered, and while fds wait for AGREE_UNIX_FD.
        self._hold_client = True
        self._release_client = False  # Hello answered: pump the client after this chunk
        # The client's calls awaiting replies, by (peer, serial); a denied call's
        # entry holds the answer that replaces the reply to its Ping.
        self._calls = PendingCalls()
        self._error_serial = 0
        self._spare_addr: str | bytes | None = None  # the bus socket, for spare.py
        # With a spare taken: what went to the bus after BEGIN until the Hello's answer
        # (to send again should the bus drop the spare); None otherwise.
        self._spare_replay: list[bytes] | None = None
        self._replay_on_connect: list[bytes] | None = None
        self._stalled: tuple[bytes | bytearray, Header, list[int] | None] | None = None

    # -- the named states ------------------------------------------------------------------

    @property
    def state(self) -> Phase:
        """The session's state: its phase, or DRAINING / CLOSED once it is ending."""
        if self.closed:
            return Phase.CLOSED
        if self.draining:
            return Phase.DRAINING
        return self.phase

    @property
    def bus_state(self) -> BusPhase:
        """Where our connection to the bus is."""
        if self._bus is None:
            return BusPhase.CONNECTING
        if self._bus_began or self._sasl_client.done:
            return BusPhase.READY
        return BusPhase.AUTH

    # -- hooks the driver fills in (I/O) ---------------------------------------------------

    def _stop_io(self) -> None:
        """Closing: cancel timers and connects."""
        raise NotImplementedError

    def _ended(self) -> None:
        """Closed, and the server told: give back what was borrowed (the spare's slot)."""
        raise NotImplementedError

    def _start_grace(self) -> None:
        """The client half-closed: call ``close_when_flushed`` after HALF_CLOSE_GRACE."""
        raise NotImplementedError

    def _client_unread(self) -> bool:
        """Whether the client sent bytes we have not read (we paused reading it)."""
        raise NotImplementedError

    def _complete_creds(self) -> None:
        """Fill in the slower credentials (groups, label), off the client's path."""
        raise NotImplementedError

    def _reconnect(self) -> None:
        """Connect to the bus again, fresh (a spare was dropped under us)."""
        raise NotImplementedError

    def _bus_on_its_way(self) -> bool:
        """Whether a bus connection is being made (an anchor's answer, a connect)."""
        raise NotImplementedError

    def _pump_client(self) -> None:
        raise NotImplementedError  # the client side (session.py)

    # -- timer events ----------------------------------------------------------------------

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
        return self._client_unread()

    def handshake_expired(self) -> None:
        """The auth timeout passed before the client's Hello went to the bus: drop it."""
        if not self.closed:
            self.close("handshake not finished in time")

    # -- the service-wide budget -----------------------------------------------------------

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

    # -- backpressure ----------------------------------------------------------------------

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

    def _client_drained(self) -> None:
        if self.draining:
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

    def _resume_client(self) -> None:
        """Read the client again after we paused it. Its idle-partial-message deadline
        starts over: the time it waited was ours (a deadline due in the same loop turn
        would otherwise find it reading, no progress made, and close it)."""
        self._client_reader.mark = -1
        self._client.start_reading()

    # -- half-close and closing ------------------------------------------------------------

    def _client_eof(self) -> None:
        # Half-closed: what the client sent still goes out, and the replies it waits
        # for still come back, for up to HALF_CLOSE_GRACE seconds.
        self._finish_after_eof()
        if not self.closed and not self.draining:
            self._start_grace()

    def _finish_after_eof(self) -> None:
        """After client EOF: close once nothing it sent is unsent and nothing is owed to it."""
        if self.closed or not self._client.eof:
            return
        if self._bus is None and self._sasl.done and self._bus_on_its_way():
            return  # the anchor's connection is on its way: _bus_attached comes back here
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

    def close_when_flushed(self) -> None:
        """Close once everything queued toward the client has been written."""
        if self._client.write_idle:
            self.close()
        else:
            self.draining = True
            self._client.on_drained = self._client_drained
            self._client.flush()

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
        self._stop_io()
        self._client.close()
        if self._bus is not None:
            self._bus.close()
        self._client_reader.close()
        self._bus_reader.close()
        if self._stalled is not None and self._stalled[2]:
            close_fds(self._stalled[2])
        self.creds.close()
        self.server.session_closed(self)
        self._ended()

    # -- the filter ------------------------------------------------------------------------

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

    def _inject(self, messages: list[bytes]) -> None:
        """Send the proxy's own messages to the bus (never expecting replies)."""
        if messages and self._spare_replay is not None:
            self._spare_replay += messages
        if messages and self._bus is not None:
            for m in messages:
                self._bus.queue(m)
            self._bus.flush()

    # -- logging ---------------------------------------------------------------------------

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
