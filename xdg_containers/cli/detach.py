"""``serve --detach``: return once the service is ready, leaving it running.

``ExecReload=`` must end (systemd waits for it, then kills it): the unit's reload
runs ``serve --replace --detach``, whose new service process stays in the unit's
cgroup and, owning the bus name, becomes the unit's main process (Type=dbus).
"""

from __future__ import annotations

import os
import select


def detach() -> tuple[int | None, int]:
    """Fork. In the child: (None, the fd to write READY=1 to, as ``--ready-fd``); in the
    parent: (the exit status: 0 once the child said READY=1, else the child's own
    status, -1)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()  # not in the caller's session: a terminal closing does not end it
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        return None, w
    os.close(w)
    data = b""
    while True:
        select.select([r], [], [])
        chunk = os.read(r, 100)
        data += chunk
        if not chunk or b"READY=1" in data:
            break
    os.close(r)
    if b"READY=1" in data:
        return 0, -1
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) or 1, -1
