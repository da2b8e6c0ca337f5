#!/usr/bin/env python3
"""Per-message cost through a filtering proxy, before and after a policy name churned N times.

A peer on a private bus acquires and releases a policy name (``--talk``) N times while a
client is connected through each proxy: our service (``python -m xdg_containers serve
--address``, AddServer with Filter) and ``xdg-dbus-proxy --filter``. xdg-dbus-proxy appends
the name to the peer's owned-names list on every acquisition and walks that list for each
message to or from the peer; we keep a set, so our cost should not move.

Measured per proxy, before and after the churn:

- ``call``: a method call from the client to the peer's unique name and its reply;
- ``signal``: a broadcast from the peer, until the client has received it.

Prints a table and one summary line with the after/before ratio per proxy. Runs in well
under a minute by default (``--budget`` bounds the measurement phases). Not a test.

    python benchmarks/churn.py [--churn 2000] [--samples 300] [--budget 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from startup import Children, add_server, spawn_xdg_dbus_proxy, start_service  # noqa: E402

from tests.support.bus import started_bus  # noqa: E402

POLICY_NAME = "org.benchmark.Churn"
EXT = "org.freedesktop.XdgContainers1."


class Client:
    """A client through one proxy, counting the peer's broadcasts it receives."""

    def __init__(self, label: str, bus: MessageBus, peer_name: str, member: str) -> None:
        self.label = label
        self.member = member  # each client matches only its own signal: no cross traffic
        self.bus = bus
        self.peer_name = peer_name
        self.signals = 0
        self.waiter: asyncio.Future[None] | None = None
        bus.add_message_handler(self._on_message)

    def _on_message(self, msg: Message) -> None:
        if (
            msg.message_type == MessageType.SIGNAL
            and msg.sender == self.peer_name
            and msg.member == self.member
        ):
            self.signals += 1
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)

    async def call_rtt(self) -> float:
        t = time.perf_counter()
        reply = await self.bus.call(
            Message(
                destination=self.peer_name, path="/", interface="org.benchmark.Iface", member="Echo"
            )
        )
        dt = time.perf_counter() - t
        assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, reply
        return dt

    async def signal_rtt(self, peer: MessageBus) -> float:
        self.waiter = asyncio.get_running_loop().create_future()
        t = time.perf_counter()
        await peer.send(Message.new_signal("/", "org.benchmark.Iface", self.member))
        await asyncio.wait_for(self.waiter, 30)
        return time.perf_counter() - t


def peer_handler(msg: Message) -> Message | None:
    if msg.message_type == MessageType.METHOD_CALL and msg.member == "Echo":
        return Message.new_method_return(msg)
    return None


async def measure(
    clients: list[Client], peer: MessageBus, samples: int, budget: float
) -> dict[tuple[str, str], list[float]]:
    """Each path in its own block (a slow proxy's work must not overlap another's samples).

    Each block gets an equal share of ``budget`` seconds and at least 20 samples.
    """
    out: dict[tuple[str, str], list[float]] = {}
    share = budget / len(clients)
    for c in clients:
        deadline = time.monotonic() + share
        calls = out.setdefault((c.label, "call"), [])
        sigs = out.setdefault((c.label, "signal"), [])
        for i in range(samples):
            if i >= 20 and time.monotonic() > deadline:
                break
            calls.append(await c.call_rtt())
            sigs.append(await c.signal_rtt(peer))
    return out


async def run(args: argparse.Namespace) -> int:
    children = Children()
    bus = started_bus()
    conns: list[MessageBus] = []
    try:
        start_service(bus.address, children)
        sock = os.path.join(children.mkdtemp("xdgc-bench-xdp-"), "bus")
        xdp = spawn_xdg_dbus_proxy(bus.address, sock, POLICY_NAME)
        children.procs.append(xdp.proc)
        children.fds.append(xdp.sync_fd)
        xdp_address = f"unix:path={sock}"

        async def connect(address: str) -> MessageBus:
            conn = await MessageBus(bus_address=address).connect()
            conns.append(conn)
            return conn

        manager = await connect(bus.address)
        _path, ours_address = await add_server(manager, POLICY_NAME, "churn")
        peer = await connect(bus.address)
        peer.add_message_handler(peer_handler)
        peer_name = peer.unique_name
        assert peer_name is not None
        # One acquisition first: the peer becomes talk (sticky) for clients connected now.
        clients = []
        paths = (
            ("direct bus", bus.address),
            ("ours", ours_address),
            ("xdg-dbus-proxy", xdp_address),
        )
        for i, (label, address) in enumerate(paths):
            conn = await connect(address)
            member = f"Tick{i}"
            await conn.call(
                Message(
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus",
                    member="AddMatch",
                    signature="s",
                    body=[f"type='signal',member='{member}'"],
                )
            )
            clients.append(Client(label, conn, peer_name, member))
        await peer.request_name(POLICY_NAME)
        await peer.release_name(POLICY_NAME)
        for c in clients:  # let every proxy see the change before measuring
            await c.call_rtt()

        start = time.monotonic()
        phase_budget = args.budget / 2
        before = await measure(clients, peer, args.samples, phase_budget)
        before_time = time.monotonic() - start
        t_churn = time.monotonic()
        for _ in range(args.churn):
            await peer.request_name(POLICY_NAME)
            await peer.release_name(POLICY_NAME)
        churn_time = time.monotonic() - t_churn
        t_after = time.monotonic()
        for c in clients:  # the first message after the churn (upstream catches up here)
            await c.call_rtt()
        catch_up = time.monotonic() - t_after
        after = await measure(clients, peer, args.samples, phase_budget)
        after_time = time.monotonic() - t_after - catch_up
        total = time.monotonic() - start

        print(
            f"churn: {args.churn} acquire/release pairs of {POLICY_NAME} in {churn_time:.2f} s;"
            f" phases: before {before_time:.1f} s, first message after {catch_up:.1f} s,"
            f" after {after_time:.1f} s; total {total:.1f} s\n"
        )
        header = (
            f"{'path':<16} {'message':<7} {'n':>4} {'before µs':>10} "
            f"{'after µs':>10} {'after/before':>12}"
        )
        print(header)
        print("-" * len(header))
        ratios: dict[str, float] = {}
        for c in clients:
            for kind in ("call", "signal"):
                b = statistics.median(before[(c.label, kind)]) * 1e6
                a = statistics.median(after[(c.label, kind)]) * 1e6
                n = min(len(before[(c.label, kind)]), len(after[(c.label, kind)]))
                ratios[f"{c.label} {kind}"] = a / b
                print(f"{c.label:<16} {kind:<7} {n:>4} {b:>10.0f} {a:>10.0f} {a / b:>12.2f}")
        print()
        summary = ", ".join(
            f"{label}: call x{ratios[label + ' call']:.2f} signal x{ratios[label + ' signal']:.2f}"
            for label in ("ours", "xdg-dbus-proxy", "direct bus")
        )
        print(f"SUMMARY after/before {args.churn} churns (median): {summary}")
        return 0
    finally:
        for conn in conns:
            conn.disconnect()
        children.cleanup()
        bus.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--churn", type=int, default=2000, help="acquire/release pairs [2000]")
    parser.add_argument("--samples", type=int, default=300,
                        help="round trips per proxy and kind, per phase [300]")
    parser.add_argument("--budget", type=float, default=45.0,
                        help="seconds for the measurement phases together [45]")
    args = parser.parse_args()
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
