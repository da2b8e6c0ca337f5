"""Admin views."""

from __future__ import annotations

from typing import Any


def add_admin_parsers(sub: Any) -> None:
    """Register list/info/identify/stop."""
