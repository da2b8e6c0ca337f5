"""Running out of fds or memory at accept(): one log line a second for the whole service.

An attacker holding fds makes every server's accept() fail at once; each failure
costing a log line would flood the journal (issue 16: ~435k lines in 8 s).
"""

from __future__ import annotations

import errno
import logging
import time

log = logging.getLogger("xdg_containers.servers.server")

#: accept() errors meaning the process (or system) is out of fds or memory for one more.
ACCEPT_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: At most one line about the shortage per this many seconds, for the whole service.
SHORTAGE_LOG_INTERVAL = 1.0
_shortage = {"logged_at": -1e9, "refused": 0}


def note_shortage(exc: OSError) -> None:
    """Count one refused connection; log the count at most once per interval."""
    _shortage["refused"] += 1
    now = time.monotonic()
    if now - _shortage["logged_at"] >= SHORTAGE_LOG_INTERVAL:
        log.warning(
            "refusing new connections for now: %s (%d refusals since the last such "
            "line; raise the fd limit or lower max_connections_per_server)",
            exc.strerror or exc,
            _shortage["refused"],
        )
        _shortage["logged_at"] = now
        _shortage["refused"] = 0
