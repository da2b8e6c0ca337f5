"""The org.freedesktop.DBus.Containers1 service objects, one module per concept.

- ``context``: the state every object shares (bus, registry, names, the current call);
- ``authorization``: who may call what (confined callers, creators);
- ``manager``: the Containers1 interface (AddServer, StopServer, GetConnectionInfo, ...),
  with ``checks`` for what AddServer is handed;
- ``objects``: the per-server objects (Containers1.Server);
- ``introspection``: Introspect and GetManagedObjects answers, produced explicitly;
- ``dispatch``: the handler that runs before dbus-fast routes a call.

Imports go down that list's dependency order only (dispatch -> manager -> objects ->
authorization -> context); nothing here imports the daemon.
"""

from .context import NAME, PATH, ServiceContext
from .dispatch import install_dispatch_hooks
from .manager import ManagerInterface
from .objects import ServerObject

__all__ = ["NAME", "PATH", "ManagerInterface", "ServerObject", "ServiceContext",
           "install_dispatch_hooks"]
