"""``xdg-containers run``."""

from __future__ import annotations

import argparse
from typing import Any


def add_run_parser(sub: Any) -> None:
    """Register ``run``."""
    p: argparse.ArgumentParser = sub.add_parser("run", help="run a command in a container")
    p.set_defaults(handler=lambda a: 1)
