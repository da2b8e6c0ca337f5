#!/usr/bin/env python3
"""The drop-in against xdg-dbus-proxy: start-up time and memory per instance (SPEC 11).

Start-up, interleaved, medians over ``--runs``: spawn the proxy the way flatpak
does (``--fd=W ADDRESS PATH --filter --talk=NAME``; the arguments on the command
line, not in a memfd), time

- **sync**: exec -> the sync byte on the pipe (what flatpak waits for), and
- **hello**: exec -> a raw client connected to PATH got its Hello reply (the first
  moment the app can use its bus; for the drop-in this includes AddServer or the
  in-process set-up, which happen after the sync byte).

Variants: ``xdg-dbus-proxy``; the drop-in as meson installs it with a C compiler
(the C front ``dropin/front.c``, which execs the Python script after the byte) and
without (the ``python -IS`` script alone), each service-backed and in-process
(``XDG_CONTAINERS_DROPIN_MODE=in-process``); and the pip console script
(``.venv/bin/xdg-containers-dbus-proxy``, with ``site``), service-backed.

Memory, with ``--instances N`` (default 20) of each kind alive at once, each with
one idle client connected: PSS per instance from ``/proc/PID/smaps_rollup``.
For the service-backed drop-in the service's share is included: its whole PSS
divided by N, plus each drop-in's own PSS ("growth" is what the service grew by
per instance: the share tends to it as N grows). A service-backed drop-in
started through the C front ends as ``front --anchor-loop`` (same pid).

    .venv/bin/python benchmarks/dropin.py [--runs 30] [--instances 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from startup import Children, memory_kib, raw_hello, readable, start_bus, start_service

from tests.support.dropin import front_dropin

TALK = "org.benchmark.Echo"


def installed_style(children: Children) -> tuple[str, str]:
    """(C front, Python script) as meson installs them, running this checkout: the
    script is ``#!PYTHON -IS`` with the checkout on sys.path, the front execs it."""
    d = children.mkdtemp("xdgc-dropin-bin-")
    front = front_dropin(d)
    return front, os.path.join(d, "xdg-containers-dbus-proxy-py")


class Variant:
    """One way of running a proxy."""

    def __init__(self, name: str, argv0: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.argv0 = argv0
        self.env = env
        self.sync: list[float] = []
        self.hello: list[float] = []


class Running:
    """A spawned proxy: its process, the read end of its sync pipe, its socket."""

    def __init__(self, proc: subprocess.Popen[bytes], sync_r: int, path: str) -> None:
        self.proc = proc
        self.sync_r = sync_r
        self.path = path

    def stop(self) -> None:
        os.close(self.sync_r)  # the proxy exits on that
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def spawn(v: Variant, bus: str, path: str) -> tuple[Running, float, float]:
    """Start one proxy; (it, seconds to the sync byte, seconds to the Hello reply)."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*v.argv0, f"--fd={w}", bus, path, "--filter", f"--talk={TALK}"],
        pass_fds=(w,), env=v.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(w)
    if not readable(r, 20) or os.read(r, 1) != b"x":
        proc.kill()
        proc.wait()
        raise SystemExit(f"{v.name}: no sync byte")
    t_sync = time.perf_counter() - t0
    sock, _name = raw_hello(path)
    t_hello = time.perf_counter() - t0
    sock.close()
    return Running(proc, r, path), t_sync, t_hello


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def main() -> int:
    """Run both measurements; print tables and SUMMARY lines."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--instances", type=int, default=20)
    args = ap.parse_args()
    children = Children()
    try:
        bus = start_bus(children)
        service = start_service(bus, children)
        runtime = children.mkdtemp("xdgc-dropin-rt-")
        base = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus, XDG_RUNTIME_DIR=runtime)
        base.pop("XDG_CONTAINERS_DROPIN_MODE", None)
        front, script = installed_style(children)
        console = os.path.join(os.path.dirname(sys.executable), "xdg-containers-dbus-proxy")
        in_process = dict(base, XDG_CONTAINERS_DROPIN_MODE="in-process")
        variants = [
            Variant("xdg-dbus-proxy", ["xdg-dbus-proxy"], base),
            Variant("drop-in C front, service", [front], base),
            Variant("drop-in C front, in-process", [front], in_process),
            Variant("drop-in script, service", [script], base),
            Variant("drop-in script, in-process", [script], in_process),
        ]
        if os.path.exists(console):
            variants.append(Variant("drop-in console script, service", [console], base))
        for v in variants:  # warm caches once
            run, _, _ = spawn(v, bus, os.path.join(runtime, "warm"))
            run.stop()
        for i in range(args.runs):
            order = variants if i % 2 == 0 else variants[::-1]
            for v in order:
                run, t_sync, t_hello = spawn(v, bus, os.path.join(runtime, f"p{i}"))
                v.sync.append(t_sync)
                v.hello.append(t_hello)
                run.stop()
        ref = variants[0]
        ref_sync = statistics.median(ref.sync)
        ref_hello = statistics.median(ref.hello)
        print(f"start-up, medians of {args.runs} interleaved runs")
        print(f"{'variant':38} {'exec->sync':>11} {'ratio':>6} {'exec->Hello':>12} {'ratio':>6}")
        for v in variants:
            s, h = statistics.median(v.sync), statistics.median(v.hello)
            print(f"{v.name:38} {fmt(s):>11} {s / ref_sync:6.2f} {fmt(h):>12} {h / ref_hello:6.2f}")
        for v in variants[1:]:
            print(f"SUMMARY startup {v.name}: sync {statistics.median(v.sync) / ref_sync:.2f}x, "
                  f"hello {statistics.median(v.hello) / ref_hello:.2f}x of xdg-dbus-proxy")

        n = args.instances
        print(f"\nmemory: {n} instances of each, one idle client each (PSS KiB per instance)")
        svc_before = memory_kib(service.pid)[1]
        for v in variants[:3]:  # the script forms end up as the same processes
            running = []
            clients = []
            for i in range(n):
                run, _, _ = spawn(v, bus, os.path.join(runtime, f"m{i}"))
                running.append(run)
                clients.append(raw_hello(run.path)[0])
            time.sleep(0.5)
            own = [memory_kib(r.proc.pid)[1] for r in running]
            svc = memory_kib(service.pid)[1]
            backed = "service" in v.name
            share = svc / n if backed else 0.0
            marginal = (svc - svc_before) / n if backed else 0.0
            per = statistics.mean(own) + share
            print(f"{v.name:38} own {statistics.mean(own):8.0f}  service share {share:7.0f}"
                  f" (growth {marginal:5.0f})  total {per:8.0f}")
            print(f"SUMMARY pss {v.name}: {per:.0f} KiB per instance")
            for c in clients:
                c.close()
            for run in running:
                run.stop()
        print(f"(service PSS before the memory runs: {svc_before} KiB)")
    finally:
        children.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
