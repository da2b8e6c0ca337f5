"""Filtering policy: levels per bus name and Call/Broadcast rules (xdg-dbus-proxy semantics)."""

from .rules import *  # noqa: F403 (the public names are rules.__all__)
from .rules import __all__ as __all__
