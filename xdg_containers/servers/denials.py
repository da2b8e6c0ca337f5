"""Denial log lines of one server, rate-limited so a client cannot flood the journal."""

from __future__ import annotations

import logging
import time

from xdg_containers.wire.header import Header
from xdg_containers.wire.names import shorten

log = logging.getLogger("xdg_containers.servers.server")

#: Denial log lines allowed per server per window before they are summarised.
DENIAL_LOG_BURST = 20
DENIAL_LOG_WINDOW = 10.0


class DenialLog:
    """At most DENIAL_LOG_BURST lines per DENIAL_LOG_WINDOW seconds, then one summary."""

    def __init__(self, path: str, app_id: str) -> None:
        """Lines name the server's ``path`` and ``app_id``."""
        self.path = path
        self.app_id = app_id
        self._window_start = 0.0
        self._in_window = 0
        self._suppressed = 0

    def log(
        self, unique_name: str | None, direction: str, hdr: Header, verdict: str, reason: str
    ) -> None:
        """Log one denial at info level (or count it when over the burst).

        Every client-chosen string is shortened (wire/names.py ``shorten``), so one line
        stays under ~1.5 KB whatever the message.
        """
        now = time.monotonic()
        if now - self._window_start > DENIAL_LOG_WINDOW:
            if self._suppressed:
                log.info("%s (%s): %d more denials not logged", self.path, self.app_id,
                         self._suppressed)
            self._window_start = now
            self._in_window = 0
            self._suppressed = 0
        self._in_window += 1
        if self._in_window > DENIAL_LOG_BURST:
            self._suppressed += 1
            return
        log.info(
            "%s (%s) %s: %s %s %s dest=%s path=%s %s.%s: %s",
            self.path,
            self.app_id,
            unique_name or "-",
            verdict,
            "C->B" if direction == "out" else "B->C",
            hdr.serial,
            shorten(hdr.destination),
            shorten(hdr.path),
            shorten(hdr.interface),
            shorten(hdr.member or hdr.error_name),
            shorten(reason, 4 * 200),
        )
