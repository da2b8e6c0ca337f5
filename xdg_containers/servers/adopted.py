"""A connection still forwarded by the previous service process after a hand-over.

``serve --replace`` moves every server to the new process, but the old one keeps
forwarding the connections it had until each closes (SPEC 13). The new process
answers for them all the same: which server they came through, who the real
client is, and that they are confined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from xdg_containers.io.peercred import PeerCredentials

if TYPE_CHECKING:
    from xdg_containers.servers.server import ContainerServer, ServerSession


@dataclass(eq=False)
class AdoptedConnection:
    """One such connection: its server (in this process), bus name and real client."""

    server: ContainerServer
    unique_name: str
    creds: PeerCredentials

    def close(self) -> None:
        """It ended: release the client's pidfd."""
        self.creds.close()


if TYPE_CHECKING:
    #: a confined connection: one of ours, or one the previous process still forwards
    Confined = ServerSession | AdoptedConnection
