"""Validators for D-Bus names and object paths, exactly as the D-Bus specification defines them.

Pure functions over ``str``; used wherever a name from a peer or a policy must be checked
before it is trusted ("Valid Names" in the specification).
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_NAME_LENGTH",
    "SHOWN_MAX",
    "is_too_long",
    "is_valid_bus_name",
    "is_valid_error_name",
    "is_valid_interface_name",
    "is_valid_member_name",
    "is_valid_object_path",
    "is_valid_unique_name",
    "is_valid_well_known_name",
    "shorten",
]

#: Bus, interface, member and error names are at most this many bytes (they are ASCII only).
MAX_NAME_LENGTH = 255
#: Client-chosen text in a log line or error message is cut to about this many characters.
SHOWN_MAX = 200

# Character classes are spelled out: `\d` and `\w` would accept non-ASCII digits/letters.
# Well-known bus name elements: [A-Za-z0-9_-], not starting with a digit; at least two.
_WELL_KNOWN_RE = re.compile(r"[A-Za-z_-][A-Za-z0-9_-]*(?:\.[A-Za-z_-][A-Za-z0-9_-]*)+")
# Unique names: ':' then elements that may start with a digit; at least two elements.
_UNIQUE_RE = re.compile(r":[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+")
# Interface (and error) names: elements [A-Za-z0-9_], not starting with a digit, no '-'.
_INTERFACE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_MEMBER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Object paths: "/" or one or more "/element" with non-empty [A-Za-z0-9_] elements.
_PATH_RE = re.compile(r"/|(?:/[A-Za-z0-9_]+)+")


def is_valid_unique_name(name: str) -> bool:
    """True if `name` is a unique connection name such as ``:1.42``.

    Elements may begin with a digit; at least two elements, at most 255 characters.
    """
    return len(name) <= MAX_NAME_LENGTH and _UNIQUE_RE.fullmatch(name) is not None


def is_valid_well_known_name(name: str) -> bool:
    """True if `name` is a well-known bus name such as ``org.example.App``.

    No element may begin with a digit; at least two elements, at most 255 characters.
    """
    return len(name) <= MAX_NAME_LENGTH and _WELL_KNOWN_RE.fullmatch(name) is not None


def is_valid_bus_name(name: str) -> bool:
    """True if `name` is a valid unique or well-known bus name."""
    if name.startswith(":"):
        return is_valid_unique_name(name)
    return is_valid_well_known_name(name)


def is_valid_interface_name(name: str) -> bool:
    """True if `name` is a valid interface name (two or more elements, no '-', 255 max)."""
    return len(name) <= MAX_NAME_LENGTH and _INTERFACE_RE.fullmatch(name) is not None


def is_valid_error_name(name: str) -> bool:
    """True if `name` is a valid error name; the specification gives them interface syntax."""
    return is_valid_interface_name(name)


def is_valid_member_name(name: str) -> bool:
    """True if `name` is a valid method or signal name (one element, no digit first, 255 max)."""
    return len(name) <= MAX_NAME_LENGTH and _MEMBER_RE.fullmatch(name) is not None


def is_valid_object_path(path: str) -> bool:
    """True if `path` is a valid object path: ``/`` or ``/a/b_c/D0`` (no empty elements).

    The specification sets no length limit of its own for paths.
    """
    return _PATH_RE.fullmatch(path) is not None


def is_too_long(name: str) -> bool:
    """True if `name` is over MAX_NAME_LENGTH bytes in UTF-8, so no valid name (cost O(1) for
    ASCII). Checked before any policy lookup: what costs more than that is never looked up."""
    if len(name) > MAX_NAME_LENGTH:
        return True
    return not name.isascii() and len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_LENGTH


def shorten(text: object, limit: int = SHOWN_MAX) -> str:
    """`text` for a log line or an error message, cut to `limit` characters with an ellipsis
    and the original length, so that no client-chosen string can make one line huge."""
    shown = text if isinstance(text, str) else str(text)
    if len(shown) <= limit:
        return shown
    return f"{shown[:limit]}...[{len(shown)} chars]"
