"""The service-wide buffer budget of one event loop (the budget itself is core/budget.py)."""

from __future__ import annotations

import asyncio
import weakref

from ..core.budget import BufferBudget

_budgets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BufferBudget] = (
    weakref.WeakKeyDictionary()
)


def budget_for(loop: asyncio.AbstractEventLoop, limit: int) -> BufferBudget:
    """The budget shared by every server of the service running on ``loop``."""
    budget = _budgets.get(loop)
    if budget is None:
        budget = _budgets[loop] = BufferBudget(limit)
    return budget
