"""Unix fds the core was handed and drops (a denied message's, a closed session's)."""

from __future__ import annotations

import os
from collections.abc import Sequence


def close_fds(fds: Sequence[int]) -> None:
    """Close fds we hold a copy of, ignoring ones already gone."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
