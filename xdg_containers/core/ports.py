"""What the session core asks of the world around it: sockets, its server, the filter.

The core never touches a socket: it writes through a ``Port`` (the asyncio driver's
Endpoint, or a test's recording fake) and tells its server through a ``SessionHost``
(a ContainerServer, which the core need not import: no proxy -> servers cycle).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..config import Limits
from ..wire.header import Header, Raw
from .budget import BufferBudget
from .decision import Decision


class Port(Protocol):
    """One side's byte stream: a queue toward the peer, reading that can pause."""

    eof: bool
    closed: bool
    pending_bytes: int
    pending_fds: int
    #: The next read goes straight into this view (a large message's buffer).
    into: memoryview | None
    on_written: Callable[[], None] | None
    on_drained: Callable[[], None] | None
    receive_fds: bool
    fault: BaseException | None

    @property
    def reading(self) -> bool:
        """Whether the peer is being read."""

    @property
    def write_idle(self) -> bool:
        """Nothing left to write."""

    def queue(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        """Append one message (and its fds) to the output; ``flush`` writes it."""

    def send(self, data: bytes | memoryview) -> None:
        """Write fd-less bytes now if nothing waits before them, else queue them."""

    def flush(self) -> None:
        """Write what the peer takes now; the rest when it takes more."""

    def pause_reading(self) -> None:
        """Stop reading (backpressure)."""

    def start_reading(self) -> None:
        """Read again."""

    def close(self) -> None:
        """Drop the output (closing its fds) and the connection."""


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


class Credentials(Protocol):
    """The client's peer credentials, as far as the core needs them."""

    @property
    def uid(self) -> int:
        """The client's uid (its SASL EXTERNAL identity must match)."""

    @property
    def completed(self) -> bool:
        """Whether the slower credentials (groups, label) were read."""

    @property
    def pid(self) -> int:
        """The client's pid (for log lines)."""

    def close(self) -> None:
        """Release what the credentials hold (the pidfd)."""


class Deadlines(Protocol):
    """A set of sessions with a deadline each (the server's DeadlineQueue)."""

    def add(self, key: Any) -> None:
        """The deadline of ``key`` starts now (unless it runs already)."""

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` has a deadline running."""


class HostSpec(Protocol):
    """The server's settings the core reads on the hot path."""

    @property
    def log_messages(self) -> bool:
        """Whether every message is logged."""


class SessionHost(Protocol):
    """The server a session belongs to: its settings, shared state and callbacks.

    (Sessions are passed as Any: the server keeps the driver's Session class, which
    the core does not know.)
    """

    path: str
    guid: str
    limits: Limits
    messages_forwarded: int
    budget: BufferBudget

    @property
    def spec(self) -> HostSpec:
        """The server's settings."""

    @property
    def partials(self) -> Deadlines:
        """Sessions holding an unfinished client message (idle partial message timeout)."""

    @property
    def log_messages(self) -> bool:
        """Whether every message is logged (the Log named argument)."""

    @property
    def service_names(self) -> frozenset[str]:
        """Our own bus names (for the no-nesting rule)."""

    def make_filter(self, session: Any) -> MessageFilter:
        """The filter for a new session."""

    def handshake_started(self, session: Any) -> None:
        """The session's auth timeout starts now."""

    def handshake_done(self, session: Any) -> None:
        """The session's Hello went to the bus."""

    def session_named(self, session: Any) -> None:
        """The session learned its unique name."""

    def session_closed(self, session: Any) -> None:
        """The session ended."""

    def count_denied(self) -> None:
        """One more message denied or dropped."""

    def log_denial(
        self, session: Any, direction: str, hdr: Header, verdict: str, reason: str
    ) -> None:
        """Log a denial (rate-limited)."""
