"""A stand-in service for the fd-store tests: keeps three listening sockets in the store.

``python -m tests.support.fdstore_program DIR SCOPE [BUS_ADDRESS]``: takes what an
earlier run kept; on the first run (nothing inherited) binds ``DIR/cN.sock`` (N = 1..3)
and stores them as ``cN.listen``; on later runs accepts every queued client on the
inherited sockets and answers ``served by run R``. Names listed in ``DIR/remove`` are
then removed from the store. Writes ``DIR/run-R.json`` (its pid, the inodes it created
and inherited, who it served; ``t0``, CLOCK_MONOTONIC at its start) when done, then
waits; SIGTERM is a clean stop (close()).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time

from xdg_containers.service.fdstore import open_fd_store

NAMES = ("c1.listen", "c2.listen", "c3.listen")


def serve_queued(fd: int, run: int) -> int:
    """Accept and answer every client already queued on listening socket ``fd``."""
    listener = socket.socket(fileno=os.dup(fd))
    listener.setblocking(False)
    served = 0
    with listener:
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return served
            with conn:
                conn.sendall(f"served by run {run}".encode())
            served += 1


def main(argv: list[str]) -> int:
    """One run of the stand-in service."""
    t0 = time.monotonic()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="program[%(process)d] %(levelname)s %(message)s")
    directory, scope = argv[1], argv[2]
    store = open_fd_store(scope, argv[3] if len(argv) > 3 else None)
    assert store is not None, "no fd store"
    run = 1 + sum(1 for n in os.listdir(directory) if n.startswith("run-"))
    inherited = store.take_inherited()
    state: dict[str, object] = {
        "pid": os.getpid(), "t0": t0, "backend": type(store).__name__,
        "inherited": {name: os.fstat(fd).st_ino for name, fd in inherited.items()},
        "cloexec": all(os.get_inheritable(fd) is False for fd in inherited.values()),
        "listen_env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }
    keep: list[socket.socket] = []
    if not inherited:
        created = {}
        for name in NAMES:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(os.path.join(directory, name.split(".")[0] + ".sock"))
            sock.listen(16)
            store.store(name, sock.fileno())
            created[name] = os.fstat(sock.fileno()).st_ino
            keep.append(sock)
        state["created"] = created
    state["served"] = {name: serve_queued(fd, run) for name, fd in inherited.items()}
    remove_file = os.path.join(directory, "remove")
    if os.path.exists(remove_file):
        with open(remove_file) as fh:
            for name in fh.read().split():
                store.remove(name)
                if name in inherited:
                    os.close(inherited.pop(name))
    def stop(*_: object) -> None:
        store.close()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    tmp = os.path.join(directory, f".run-{run}.json")
    with open(tmp, "w") as fh:
        json.dump(state, fh)
    os.rename(tmp, os.path.join(directory, f"run-{run}.json"))
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
