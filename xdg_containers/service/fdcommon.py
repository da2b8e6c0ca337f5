"""What both fd-store backends share: the interface, fd names, logging a failure once."""

from __future__ import annotations

import logging
from typing import Protocol

from xdg_containers.service.fdproto import NAME_MAX, valid_name

log = logging.getLogger("xdg_containers.service.fdstore")


class FdStore(Protocol):
    """Where the service keeps fds by name so that its next run gets them back."""

    def store(self, name: str, fd: int) -> None:
        """Keep a copy of ``fd`` under ``name``, replacing an earlier one; never raises
        (a failure is logged once per kind) except ValueError for a bad name."""

    def remove(self, name: str) -> None:
        """Forget ``name``, closing the kept copy."""

    def take_inherited(self) -> dict[str, int]:
        """The fds an earlier run kept, by name (call once, at start); the caller owns
        them (close-on-exec set)."""

    def close(self) -> None:
        """A clean stop: drop everything kept, so the next run restores nothing."""


def check_name(name: str) -> None:
    """ValueError unless ``name`` is 1-255 of ASCII letters, digits, '.', '-', '_'."""
    if not valid_name(name):
        raise ValueError(
            f"fd name {name[:80]!r} is not 1-{NAME_MAX} ASCII letters, digits, '.', '-', '_'"
        )


class FailureLog:
    """Logs a failure the first time its kind happens (a store that keeps failing, say
    with the manager's store full, must not flood the log)."""

    def __init__(self, what: str) -> None:
        """``what``: the backend, named in every line."""
        self.what = what
        self.seen: set[str] = set()

    def __call__(self, kind: str, text: str) -> None:
        """Log ``text`` unless a failure of ``kind`` was logged before."""
        if kind not in self.seen:
            self.seen.add(kind)
            log.warning("%s: %s (further failures of this kind are not logged)",
                        self.what, text)
