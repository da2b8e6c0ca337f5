"""dbus-fast's own decoding of raw messages in tests, on every supported release.

Tests compare the product's wire/ code with dbus-fast's private Unmarshaller, whose
constructor gained a ``negotiate_unix_fd`` argument after 1.84.2 (Debian 12's).
"""

from __future__ import annotations

from typing import Any

from dbus_fast._private.unmarshaller import Unmarshaller


def unmarshaller(stream: Any, sock: Any = None) -> Any:
    """An Unmarshaller reading ``stream``, or ``sock`` with its fds, on any dbus-fast."""
    try:
        return Unmarshaller(stream, sock, sock is not None)
    except TypeError:  # 1.84.2: (stream, sock)
        return Unmarshaller(stream, sock)

