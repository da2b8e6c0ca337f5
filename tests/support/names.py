"""D-Bus names the tests use: interfaces, named arguments (SPEC §3) and error names."""

from __future__ import annotations

SERVER_IFACE = "org.freedesktop.DBus.Containers1.Server"
PROPS = "org.freedesktop.DBus.Properties"
EXT = "org.freedesktop.XdgContainers1."
FILTER = "org.freedesktop.XdgContainers1.Filter"
POLICY = "org.freedesktop.XdgContainers1.Policy"
CALL = "org.freedesktop.XdgContainers1.Call"
BROADCAST = "org.freedesktop.XdgContainers1.Broadcast"
BUS_ARG = "org.freedesktop.XdgContainers1.Bus"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
NAME_HAS_NO_OWNER = "org.freedesktop.DBus.Error.NameHasNoOwner"
SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
