"""D-Bus error names we answer with, and a helper to raise them with a clear message."""

from __future__ import annotations

from dbus_fast import DBusError

NOT_CONTAINER = "org.freedesktop.DBus.Error.NotContainer"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"
NAME_HAS_NO_OWNER = "org.freedesktop.DBus.Error.NameHasNoOwner"
FAILED = "org.freedesktop.DBus.Error.Failed"
SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
NOT_SUPPORTED = "org.freedesktop.DBus.Error.NotSupported"


def not_container(what: str) -> DBusError:
    """NotContainer: the path or name is not one of our servers/connections."""
    return DBusError(NOT_CONTAINER, what)


def access_denied(what: str) -> DBusError:
    """AccessDenied with the reason."""
    return DBusError(ACCESS_DENIED, what)


def invalid_args(what: str) -> DBusError:
    """InvalidArgs saying which argument is wrong and why."""
    return DBusError(INVALID_ARGS, what)


def limits_exceeded(what: str) -> DBusError:
    """LimitsExceeded naming the limit."""
    return DBusError(LIMITS_EXCEEDED, what)


def name_has_no_owner(name: str) -> DBusError:
    """NameHasNoOwner for a name nobody owns (or that is not a valid name)."""
    return DBusError(NAME_HAS_NO_OWNER, f"the name {name!r} has no owner")


def failed(what: str) -> DBusError:
    """Failed: something went wrong on our side; the text says what."""
    return DBusError(FAILED, what)
