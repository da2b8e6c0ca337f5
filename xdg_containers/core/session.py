"""The session core: one proxied connection, fed what both sides sent, sans I/O.

Life of a session: answer the client's handshake ourselves (server-side SASL),
while our own handshake with the bus (client-side SASL) is pipelined behind it:
BEGIN and the Hello follow our AUTH without waiting for the bus's OK. Then
forward whole messages each way, judged by the server's filter. The client's
Hello goes through, so it keeps its own unique name on the bus; nothing after
Hello is forwarded until the bus has answered it, so the name is known before
any peer can ask about it. ``phase.py`` names the states.

Events in: ``_client_data``/``_client_filled``/``_client_eof`` (client reads),
``_bus_attached`` and ``_bus_data``/``_bus_filled``/``_bus_eof``/``_bus_error``
(bus side, bus_side.py), ``handshake_expired``/``partial_expired`` (timers),
``budget_resume`` (the service-wide budget). Actions out: through the two
``Port``s (queue, send, flush, pause/start reading, close) and the
``SessionHost`` callbacks (count, log, named, closed).
"""

from __future__ import annotations

from ..sasl.server import SaslError
from ..wire.build import bus_call
from ..wire.header import METHOD_CALL, MessageError, parse_header
from ..wire.types import SignatureError
from .budget import CHUNK
from .bus_side import BusSide
from .decision import BUS_NAME, Verdict
from .fastpath import scan_calls
from .fds import close_fds
from .phase import Phase
from .ports import Port

_AUTH = Phase.AUTH


class SessionCore(BusSide):
    """A proxied connection from one confined client to the real bus, without I/O."""

    __slots__ = ()

    def _client_error(self, reason: str) -> None:
        self.close(f"client connection: {reason}")

    def _client_data(self, data: bytes, fds: list[int]) -> None:
        if self.closed:
            close_fds(fds)
            return
        if self.phase is _AUTH:
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
            self.phase = Phase.BEGUN
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
                        self.phase = Phase.HELLO_PENDING
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
            self._complete_creds()  # off the client's path: the bus is busy with its Hello
        self._forwarded_to_bus(bus)

    def _forwarded_to_bus(self, bus: Port) -> None:
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


