"""What AddServer decided for a server (its spec, its filter settings), and where sockets go."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xdg_containers.policy import Policy


@dataclass
class FilterSettings:
    """Whether and how a server's traffic is filtered (replaced as a whole by SetPolicy)."""

    enabled: bool = False
    policy: Policy | None = None


@dataclass
class ServerSpec:
    """Everything AddServer decided, before any socket exists."""

    container_type: str
    app_id: str
    instance_id: str
    metadata: dict[str, Any]
    creator: dict[str, Any]
    creator_uid: int
    creator_name: str
    bus_address: str
    stop_on_disconnect: bool = True
    log_messages: bool = False
    filter: FilterSettings = field(default_factory=FilterSettings)
    #: False when ``bus_address`` is another bus than the service's own.
    on_service_bus: bool = True
    #: Filter/Policy/Call/Broadcast as last given (AddServer, SetPolicy): kept for the record
    policy_arguments: dict[str, Any] = field(default_factory=dict)
    #: the anchor is the launcher's (Connector), not one the service started
    connector: bool = False
    #: the server stops listening when the launcher's StopOnNotify fd fires
    stop_on_notify: bool = False


def runtime_socket_dir() -> str:
    """``$XDG_RUNTIME_DIR/dbus-1/containers``, created 0700 on demand."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        raise OSError("XDG_RUNTIME_DIR is not set; cannot mint sockets")
    path = runtime
    for part in ("dbus-1", "containers"):
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.getuid():
            raise OSError(f"{path} is not a directory owned by us")
        if st.st_mode & 0o077:
            os.chmod(path, 0o700)
    return path
