#!/usr/bin/env python3
"""Ours against xdg-dbus-proxy --filter from a proxybench JSON file: rate and CPU ratios.

    benchmarks/proxy_ratio.py /tmp/proxy.json [more.json ...]

Prints, per scenario and client count, ours/xdg-filter for the rate (>= 1.00 meets the
issue's target) and for proxy CPU per call (< 1.00: ours uses less), then one summary line.
Standard library only (runs with the system python3).
"""

from __future__ import annotations

import json
import sys


def ratios(
    path: str, ours: str = "ours", ref: str = "xdg-filter"
) -> list[tuple[str, float, float]]:
    """(scenario@clients, rate ratio, CPU ratio) for every scenario both variants ran."""
    with open(path) as f:
        medians = json.load(f)["medians"]
    out = []
    for key, m in medians.items():
        scenario, clients, variant = key.split("|")
        if variant != ours:
            continue
        r = medians.get(f"{scenario}|{clients}|{ref}")
        if r is None or not r["rate"]:
            continue
        label = scenario if clients == "1" else f"{scenario}@{clients}"
        ref_cpu = r["proxy_cpu_us_per_call"]
        cpu = m["proxy_cpu_us_per_call"] / ref_cpu if ref_cpu else 0.0
        out.append((label, m["rate"] / r["rate"], cpu))
    return out


def main() -> int:
    """Print a table and a SUMMARY line per file."""
    if len(sys.argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for path in sys.argv[1:]:
        rows = ratios(path)
        print(f"# {path}: ours / xdg-dbus-proxy --filter (rate >= 1.00 meets the target)")
        print(f"  {'scenario':10} {'rate':>6} {'CPU':>6}")
        for label, rate, cpu in rows:
            print(f"  {label:10} {rate:6.2f} {cpu:6.2f}")
        met = all(rate >= 1.0 for _label, rate, _cpu in rows)
        summary = " ".join(f"{label}={rate:.2f}" for label, rate, _cpu in rows)
        print(f"SUMMARY ours/xdg-filter rate: {summary} | all >= 1.00: {'yes' if met else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
