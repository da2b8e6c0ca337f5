"""Fixtures shared by the integration tests (the private bus and the service come from
tests/conftest.py and tests/support/bus.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.helpers_c1 import Observer, observing
from tests.support.bus import PrivateBus


@pytest.fixture
async def observer(bus: PrivateBus) -> AsyncIterator[Observer]:
    """A third connection to the real bus recording ServerRemoved, NameOwnerChanged and
    (after ``watch_properties``) more."""
    async with observing(bus.address) as obs:
        yield obs
