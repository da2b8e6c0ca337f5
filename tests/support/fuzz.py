"""Hypothesis settings of the fuzz tests: derandomized and short by default (a fixed set of
examples in every run), ``XDGC_FUZZ_EXAMPLES=N`` for a long random run."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_LONG = int(os.environ.get("XDGC_FUZZ_EXAMPLES", "0"))


def fuzz_settings(default_examples: int = 100) -> settings:
    """The settings for one fuzz module (``default_examples`` unless a long run is asked)."""
    return settings(
        max_examples=_LONG or default_examples,
        derandomize=not _LONG,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
