"""Filtering policy: levels per bus name and Call/Broadcast rules (xdg-dbus-proxy semantics)."""

from xdg_containers.policy.rules import *  # noqa: F403 (the public names are rules.__all__)
from xdg_containers.policy.rules import __all__ as __all__
