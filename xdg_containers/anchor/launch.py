"""A launcher's own anchor: the anchor program's ``serve`` in bubblewrap with the instance's
identity (binary.py picks the program: the C one, else program.py).

``xdg-containers run`` starts one per server before AddServer and passes the
service's end as Connector (SPEC 10). It runs in a session of its own (the
terminal's Ctrl-C is for the app, not for it) and outlives the launcher while
the server has connections (the app's background processes may keep some).
With ``--sandbox`` it is a sibling of the app's sandbox, outside the app's
pid namespace, so the app can neither kill nor ptrace it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass

from xdg_containers.anchor.sandbox import anchor_argv, identity_text


class AnchorSpawnError(Exception):
    """The anchor could not be started; the text says why."""


@dataclass
class SpawnedAnchor:
    """A running anchor and the service's end of its Connector (to pass to AddServer)."""

    process: subprocess.Popen[bytes]
    connector: socket.socket

    def close(self) -> None:
        """Close our end of the Connector; the anchor exits when the service closes its end
        (the server ended), which may be after the launcher exited."""
        self.connector.close()


def spawn_anchor(container_type: str, app_id: str, instance_id: str) -> SpawnedAnchor:
    """Start an anchor in bubblewrap whose root carries the instance's identity file."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise AnchorSpawnError(
            "bubblewrap (bwrap) is not installed: it runs the anchor that connects the "
            "app to the bus under the app's identity"
        )
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    identity = os.memfd_create("xdg-containers-identity", 0)
    try:
        os.write(identity, identity_text(container_type, app_id, instance_id).encode("utf-8"))
        os.lseek(identity, 0, os.SEEK_SET)
        argv = anchor_argv(bwrap, container_type, theirs.fileno(), identity)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            # It may outlive the launcher: holding the launcher's output open would keep
            # a caller reading it (a shell's $(...)) waiting for the anchor.
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(), identity),
            start_new_session=True,
        )
    except OSError as exc:
        ours.close()
        raise AnchorSpawnError(f"cannot start the anchor with {bwrap}: {exc}") from exc
    finally:
        theirs.close()
        os.close(identity)
    return SpawnedAnchor(proc, ours)
