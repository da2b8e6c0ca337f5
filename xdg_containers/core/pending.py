"""The client's calls that still await a reply, keyed by (peer, serial), oldest first (pure).

One table per session, for every kind of server and across SetPolicy filter swaps: the
calls that went to the bus (driver calls, and the Peer.Ping standing in for a denied call,
which carries the client's serial and is answered with the denial) and the calls to peers.
A client may reuse a serial while earlier calls with it are unanswered, so each serial
holds a short FIFO, and a reply takes the oldest call it can answer:

- a METHOD_RETURN from the bus driver answers a call to the driver (the driver answers
  in order; StartServiceByName may answer late, harmlessly: filtered content is judged
  by the reply itself, see PolicyFilter);
- an ERROR from the bus driver may answer any call (the bus reports unknown names,
  refusals and NoReply for peer calls), the oldest one;
- a reply from a peer answers a call to that unique name, or else to a well-known name
  (its owner answers for it), never a call to the driver.

So a reused serial can at worst give one of the client's own calls another of its
answers; it never makes a driver reply pass as a peer's, nor skips a denial.
"""

from __future__ import annotations

from .decision import BUS_NAME, Decision

#: One outstanding call: where it went (BUS_NAME for driver calls and denied calls'
#: Pings, "" for calls without destination) and, for a denied call, its answer.
Pending = tuple[str, "Decision | None"]

#: Bounds (memory per connection is bounded): distinct serials, and calls per serial.
MAX_SERIALS = 65536
MAX_SAME_SERIAL = 64


def _answers(peer: str, sender: str | None, is_error: bool) -> bool:
    """Whether a reply from ``sender`` may answer a call that went to ``peer``."""
    if sender == BUS_NAME:
        return is_error or peer == BUS_NAME
    if peer == BUS_NAME:
        return False
    if peer.startswith(":"):
        return peer == sender
    return True  # a well-known name (or none): whoever owns it answers


class PendingCalls:
    """The client's calls awaiting replies: (peer, serial) -> FIFO of calls."""

    __slots__ = ("_by_serial",)

    def __init__(self) -> None:
        """Nothing outstanding."""
        # serial -> one call (the common case: no allocation beyond the tuple) or a FIFO.
        self._by_serial: dict[int, Pending | list[Pending]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_serial)

    def __len__(self) -> int:
        """How many serials have calls outstanding."""
        return len(self._by_serial)

    def sent(self, serial: int, peer: str, denied: Decision | None = None) -> bool:
        """Record a call that went out (``denied``: its Ping stands for a denied call).

        False when the serial already has MAX_SAME_SERIAL calls outstanding: the call is
        not recorded (a denied call's Ping must then not be sent).
        """
        table = self._by_serial
        entry: Pending = (peer, denied)
        current = table.get(serial)
        if current is None:
            table[serial] = entry
            if len(table) > MAX_SERIALS:
                # A client that never waits for replies: forget the oldest serial.
                del table[next(iter(table))]
            return True
        if type(current) is tuple:
            table[serial] = [current, entry]
            return True
        assert isinstance(current, list)
        if len(current) >= MAX_SAME_SERIAL:
            return False
        current.append(entry)
        return True

    def answered(self, sender: str | None, reply_serial: int, is_error: bool) -> Pending | None:
        """Take the oldest call a reply from ``sender`` can answer; None if there is none."""
        table = self._by_serial
        current = table.get(reply_serial)
        if current is None:
            return None
        if type(current) is tuple:
            if _answers(current[0], sender, is_error):
                del table[reply_serial]
                return current
            return None
        assert isinstance(current, list)
        for i, entry in enumerate(current):
            if _answers(entry[0], sender, is_error):
                del current[i]
                if len(current) == 1:
                    table[reply_serial] = current[0]
                return entry
        return None
