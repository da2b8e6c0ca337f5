"""The bus side of a session: our handshake with the bus, then every message it sends.

Replies are matched to the client's calls (pending.py); a denied call's Ping is
answered with its denial, the Hello's answer names the client, and the rest is
judged by the filter. Leading peer replies in a chunk take the fast path
(fastpath.py). A spare connection the bus drops before any message is replaced
by a fresh one carrying the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from ..sasl.client import SaslClient
from ..sasl.server import SaslError
from ..wire.build import error_reply, method_return
from ..wire.framing import MessageReader
from ..wire.header import ERROR, METHOD_RETURN, Header, MessageError, Raw, parse_header
from ..wire.types import SignatureError, read_string
from .budget import CHUNK
from .decision import BUS_NAME, Decision, Verdict
from .fastpath import scan_replies
from .fds import close_fds
from .phase import Phase
from .ports import Port
from .state import SessionState, log


class BusSide(SessionState):
    """What comes from the bus, and our connection to it."""

    __slots__ = ()

    def _bus_attached(self, bus: Port, auth_sent: bool = False) -> None:
        """The driver has a bus connection for us (``auth_sent``: a spare whose AUTH
        went already): start, or catch up with the client's handshake."""
        self._bus = bus
        opening = b"" if auth_sent else self._sasl_client.start()
        if self.phase is Phase.AUTH:
            if opening:
                bus.send(opening)
            bus.start_reading()
            return
        # The client finished its handshake first (pipelined, or the connect took a
        # task): its messages, Hello first, may follow our BEGIN at once.
        bus.queue(opening + self._sasl_client.begin(self._sasl.negotiated_unix_fd))
        replay, self._replay_on_connect = self._replay_on_connect, None
        for m in replay or ():
            bus.queue(m)
        bus.start_reading()
        if self._hello_serial is None:
            self._hold_client = False
        self._pump_client()
        bus.flush()
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
        self._sasl_client = SaslClient(self._sasl_client.uid)
        self._bus_began = False
        self._replay_on_connect = replay
        self._reconnect()
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

    def _aim(self, endpoint: Port | None, reader: MessageReader) -> None:
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
                    if fds:
                        close_fds(fds)
                    client.queue(self._denial(entry[1], rs))
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

    def _denial(self, denied: Decision, reply_serial: int) -> bytes:
        """Our answer to a denied call, in place of the bus's answer to its Ping."""
        self._error_serial = (self._error_serial % 0x7FFFFFFF) + 1
        if denied.verdict is Verdict.ANSWER:
            return method_return(
                self._error_serial, reply_serial, BUS_NAME, self.unique_name,
                denied.reply_signature, denied.data,
            )
        return error_reply(
            self._error_serial, reply_serial, self.unique_name, denied.error_name, denied.text
        )

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
        self.phase = Phase.RUNNING
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
