#!/usr/bin/env python3
"""Start xdg-containers on a bus, mint one server, print its address, serve until killed.

Used as a proxybench proxy command: ``mint.py {bus} [--filter --talk NAME]``.
The first stdout line is the client address, as proxybench expects. Self-contained (dbus-fast
and the standard library only): A/B runs copy it into older checkouts (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def mint(bus_address: str, filtered: bool, talk: list[str]) -> str:
    """AddServer on the running service; return the minted address."""
    bus = await MessageBus(bus_address=bus_address).connect()
    named: dict[str, Variant] = {"StopOnDisconnect": Variant("b", False)}
    if filtered:
        named["org.freedesktop.XdgContainers1.Filter"] = Variant("b", True)
        policy = dict.fromkeys(talk, "talk")
        named["org.freedesktop.XdgContainers1.Policy"] = Variant("a{ss}", policy)
    manager = "org.freedesktop.DBus.Containers1"
    body = ["org.example.Bench", "org.example.Bench", "1", {}, named]
    reply = await bus.call(Message(destination=manager, path="/org/freedesktop/DBus/Containers1",
                                   interface=manager, member="AddServer",
                                   signature="sssa{sv}a{sv}", body=body))
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        raise SystemExit(f"AddServer failed: {reply.error_name}: {reply.body}")
    bus.disconnect()
    return str(reply.body[1]["Address"].value)


def main() -> int:
    """Run the service as a child, mint, print, wait for a signal."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bus")
    parser.add_argument("--filter", action="store_true")
    parser.add_argument("--talk", action="append", default=[])
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    own_runtime = not os.environ.get("XDG_RUNTIME_DIR")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.mkdtemp(prefix="xdgc-bench-")
    r, w = os.pipe()
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime, PYTHONPATH=REPO)
    child = subprocess.Popen(
        [args.python, "-m", "xdg_containers", "serve", "--address", args.bus,
         "--ready-fd", str(w)],
        # cwd: ``-m`` puts the working directory first on sys.path, ahead of
        # PYTHONPATH; without it an A/B run from one checkout measures that one twice.
        pass_fds=(w,), env=env, stderr=subprocess.DEVNULL, cwd=REPO,
    )
    os.close(w)
    if b"READY=1" not in os.read(r, 100):
        child.wait()
        raise SystemExit(f"the service did not start (exit status {child.returncode})")
    address = asyncio.run(mint(args.bus, args.filter, args.talk))
    print(address, flush=True)

    def stop(*_: object) -> None:
        child.terminate()  # the wait below returns once it is gone

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    child.wait()
    if own_runtime:
        shutil.rmtree(runtime, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
