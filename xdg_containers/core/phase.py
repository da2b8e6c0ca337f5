"""The named states of a proxied connection (tests/unit/test_core_table.py drives them)."""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """Where the client's side of a session is; ``SessionCore.state`` adds the ends.

    AUTH -> BEGUN -> HELLO_PENDING -> RUNNING, then DRAINING (closing once what is
    owed to the client is written) and CLOSED from any of them. The bus side
    (``BusPhase``) runs alongside: our handshake with the bus is pipelined behind
    the client's, so neither waits for the other except where a message must.
    """

    AUTH = "auth"  # the client's SASL handshake: we answer it ourselves
    BEGUN = "begun"  # the client sent BEGIN; its Hello has not gone to the bus yet
    HELLO_PENDING = "hello-pending"  # the Hello went; the client is held until it is answered
    RUNNING = "running"  # the Hello was answered: messages flow both ways, judged
    DRAINING = "draining"  # nothing more is read from the bus: close once flushed
    CLOSED = "closed"


class BusPhase(enum.Enum):
    """Where our own connection to the bus is."""

    CONNECTING = "connecting"  # no bus socket yet (the anchor's answer, or a connect)
    AUTH = "auth"  # our AUTH went; the bus's OK not seen yet (fd-less messages may follow)
    READY = "ready"  # the bus's handshake is over
