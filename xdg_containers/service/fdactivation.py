"""The fd keeper's activation on demand: ask the bus to start the service.

When a client waits on a kept listening socket and no service is connected, the keeper
connects to the bus the service named and writes the bytes the service prepared (SASL
EXTERNAL, Hello, StartServiceByName), then reads until the answer to the call arrives,
the bus hangs up or ``TIMEOUT`` passes. A start that brought no service is retried no
sooner than ``RETRY_DELAY`` later, so a broken service is not started in a tight loop.
Stdlib only (see ``fdproto``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

#: Seconds between an activation that did not bring a service and the next attempt.
RETRY_DELAY = 5.0
#: Seconds an activation may stay unanswered before the bus connection is dropped.
TIMEOUT = 60.0
#: The serial of StartServiceByName in the prepared bytes (Hello is 1).
CALL_SERIAL = 2


class Activation:
    """One bus connection at a time, asking for the service."""

    def __init__(self, bus: bytes | None, message: bytes | None,
                 outcome: Callable[[bytes, int], str | None],
                 log: Callable[[str], None]) -> None:
        """``bus``: the socket address; ``message``: what to write (None: cannot start).
        ``outcome`` reads the answer out of what the bus sent."""
        self.bus = bus
        self.message = message
        self.outcome = outcome
        self.log = log
        self.conn: socket.socket | None = None
        self.data = b""
        self.started_at = 0.0
        self.retry_at = 0.0
        self.said_no_bus = False

    def may_start(self, now: float) -> bool:
        """True when a waiting client may trigger a start (none in flight, not too soon)."""
        return self.conn is None and now >= self.retry_at

    def start(self, name: str) -> None:
        """A client waits on ``name``: connect and ask."""
        self.retry_at = time.monotonic() + RETRY_DELAY
        if self.bus is None or self.message is None:
            if not self.said_no_bus:
                self.said_no_bus = True
                self.log("a client waits, but no bus was given to start the service on")
            return
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        conn.settimeout(5.0)
        try:
            conn.connect(self.bus)
            conn.sendall(self.message)
        except OSError as exc:
            conn.close()
            self.log(f"cannot ask the bus to start the service: {exc}")
            return
        self.log(f"a client is waiting on {name}: asked the bus to start the service")
        conn.setblocking(False)
        self.conn, self.data = conn, b""
        self.started_at = time.monotonic()

    def readable(self) -> None:
        """Read the bus's answer; once it is in (or the bus hung up), close."""
        assert self.conn is not None
        try:
            chunk = self.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self.data += chunk
        answer = self.outcome(self.data, CALL_SERIAL)
        if answer is None and chunk and len(self.data) < 1 << 20:
            return
        self.log(f"the bus's answer: {answer or 'none (it hung up)'}")
        self.end()

    def end(self) -> None:
        """Close the bus connection; the next start waits RETRY_DELAY."""
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.retry_at = time.monotonic() + RETRY_DELAY

    def timeout(self, now: float) -> float:
        """Seconds until something is due (a retry, or giving up on the answer)."""
        if self.conn is not None:
            due = self.started_at + TIMEOUT
            if now >= due:
                self.log("the bus did not answer the start request")
                self.end()
                return RETRY_DELAY
            return due - now
        return max(self.retry_at - now, 0.0) or TIMEOUT
