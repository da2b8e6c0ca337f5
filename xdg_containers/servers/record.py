"""A server's registry entry as written to disk and read back (SPEC 13), pure.

A restarted service brings back every server that was listening from these
records. The file may have been written by an older version or by anyone who got
write access to the user's runtime directory, so reading one back validates every
field as AddServer validates its arguments; a record that does not fit is refused
with a message naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Variant

from xdg_containers.servers.arguments import ArgumentError, parse_policy_arguments
from xdg_containers.servers.registry import SERVER_PATH_PREFIX
from xdg_containers.servers.valuejson import SignatureError, decode, encode
from xdg_containers.wire.address import AddressError, parse_address
from xdg_containers.wire.names import is_valid_unique_name

#: The format written; a reader refuses any other.
VERSION = 1
_PATH_RE = re.compile(re.escape(SERVER_PATH_PREFIX) + r"(0|[1-9][0-9]{0,17})")
_GUID_RE = re.compile(r"[0-9a-f]{32}")
_MAX_TEXT = 4096


class RecordError(ValueError):
    """A stored record is malformed; the message names the field."""


@dataclass(frozen=True)
class ServerRecord:
    """What a server needs to be brought back: identity, metadata, socket, policy."""

    path: str
    container_type: str
    app_id: str
    instance_id: str
    metadata: dict[str, Variant]
    creator: dict[str, Variant]
    creator_uid: int
    creator_name: str
    bus_address: str
    guid: str
    #: the minted socket's path; None when the launcher handed in ListenFD
    socket_path: str | None
    stop_on_disconnect: bool = True
    log_messages: bool = False
    #: SetPolicy's keys (Filter, Policy, Call, Broadcast) as last given
    policy_arguments: dict[str, Variant] = field(default_factory=dict)
    #: the anchor was the launcher's (Connector): after a crash only the launcher can
    #: bring it back (by calling AddServer again), the service cannot
    connector: bool = False
    #: the launcher's StopOnNotify fd ended the server's listening: lost in a crash
    stop_on_notify: bool = False
    #: (st_dev, st_ino) of the listening socket: a launcher's re-registration with the
    #: same socket (ListenFD) is recognised by it
    socket_id: tuple[int, int] | None = None

    @property
    def number(self) -> int:
        """The N of the object path's ``cN``: restored paths are never handed out again."""
        return int(self.path[len(SERVER_PATH_PREFIX):])

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON data."""
        return {
            "version": VERSION,
            "path": self.path,
            "container_type": self.container_type,
            "app_id": self.app_id,
            "instance_id": self.instance_id,
            "metadata": encode("a{sv}", self.metadata),
            "creator": encode("a{sv}", self.creator),
            "creator_uid": self.creator_uid,
            "creator_name": self.creator_name,
            "bus_address": self.bus_address,
            "guid": self.guid,
            "socket_path": self.socket_path,
            "stop_on_disconnect": self.stop_on_disconnect,
            "log_messages": self.log_messages,
            "policy_arguments": encode("a{sv}", self.policy_arguments),
            "connector": self.connector,
            "stop_on_notify": self.stop_on_notify,
            "socket_id": list(self.socket_id) if self.socket_id is not None else None,
        }


def record_from_json(data: Any) -> ServerRecord:
    """Validate ``data`` (untrusted, e.g. parsed from a file) into a ServerRecord."""
    if not isinstance(data, dict):
        raise RecordError("a record must be a JSON object")
    if data.get("version") != VERSION:
        raise RecordError(f"version {data.get('version')!r} is not {VERSION}")
    known = set(ServerRecord.__dataclass_fields__) | {"version"}
    extra = sorted(set(data) - known)
    if extra:
        raise RecordError(f"unknown field {extra[0]!r}")
    path = _text(data, "path")
    if not _PATH_RE.fullmatch(path):
        raise RecordError(f"path {path!r} is not a server path")
    creator_name = _text(data, "creator_name")
    if not is_valid_unique_name(creator_name):
        raise RecordError(f"creator_name {creator_name!r} is not a unique name")
    bus_address = _text(data, "bus_address")
    try:
        parse_address(bus_address)
    except AddressError as exc:
        raise RecordError(f"bus_address: {exc}") from None
    guid = _text(data, "guid")
    if not _GUID_RE.fullmatch(guid):
        raise RecordError("guid must be 32 lowercase hex digits")
    socket_path = data.get("socket_path")
    if socket_path is not None:
        socket_path = _text(data, "socket_path")
        if not socket_path.startswith("/"):
            raise RecordError("socket_path must be absolute")
    uid = data.get("creator_uid")
    if type(uid) is not int or not 0 <= uid < 2**32 - 1:
        raise RecordError("creator_uid must be a uid")
    policy_arguments = _dict(data, "policy_arguments")
    _check_policy(policy_arguments)
    return ServerRecord(
        path=path,
        container_type=_text(data, "container_type"),
        app_id=_text(data, "app_id"),
        instance_id=_text(data, "instance_id"),
        metadata=_dict(data, "metadata"),
        creator=_dict(data, "creator"),
        creator_uid=uid,
        creator_name=creator_name,
        bus_address=bus_address,
        guid=guid,
        socket_path=socket_path,
        stop_on_disconnect=_flag(data, "stop_on_disconnect"),
        log_messages=_flag(data, "log_messages"),
        policy_arguments=policy_arguments,
        connector=_flag(data, "connector", False),
        stop_on_notify=_flag(data, "stop_on_notify", False),
        socket_id=_socket_id(data.get("socket_id")),
    )


def _check_policy(args: Mapping[str, Variant]) -> None:
    # SetPolicy's own check: its keys only, their types, a consistent policy.
    try:
        parse_policy_arguments(args)
    except ArgumentError as exc:
        raise RecordError(f"policy_arguments: {exc}") from None


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or "\0" in value or len(value) > _MAX_TEXT:
        raise RecordError(f"{key} must be a string without NUL of at most {_MAX_TEXT} chars")
    return value


def _flag(data: dict[str, Any], key: str, default: bool | None = None) -> bool:
    # A default: the field came after version 1's first release (absent means it).
    value = data.get(key, default)
    if type(value) is not bool:
        raise RecordError(f"{key} must be true or false")
    return value


def _socket_id(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or any(type(v) is not int or not 0 <= v < 2**64 for v in value)):
        raise RecordError("socket_id must be null or [device, inode]")
    return (value[0], value[1])


def _dict(data: dict[str, Any], key: str) -> dict[str, Variant]:
    try:
        value = decode("a{sv}", data.get(key))
    except SignatureError as exc:
        raise RecordError(f"{key}: {exc}") from None
    return dict(value)
