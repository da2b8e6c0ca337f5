"""Who owns which bus name, and which names each unique name ever owned (pure).

One tracker serves every filtered connection of the service. It is fed by
NameOwnerChanged from the service's own connection and, in order with each
client's stream, by the NameOwnerChanged signals that stream carries. Applying
the same change twice is harmless, so the sources need no coordination.

Per-message cost does not grow with churn: sets only, pruned when a unique
name leaves the bus.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

#: Unique names remembered after they left, so late news about them is ignored.
_GONE_MEMORY = 8192


class NameTracker:
    """Current owners of well-known names, and the sticky history per unique name."""

    def __init__(self) -> None:
        """Start knowing nothing; feed ``name_owner_changed`` and ``learn_owner``."""
        self._owner: dict[str, str] = {}
        self._owned: dict[str, set[str]] = {}
        self._gone: OrderedDict[str, None] = OrderedDict()
        self.on_unique_gone: list[Callable[[str], None]] = []

    def owner_of(self, name: str) -> str | None:
        """The unique name owning ``name`` now, if known."""
        return self._owner.get(name)

    def names_of(self, unique_name: str) -> frozenset[str] | set[str]:
        """Every well-known name ``unique_name`` has owned while connected (sticky)."""
        return self._owned.get(unique_name, _EMPTY)

    def history_size(self, unique_name: str) -> int:
        """Grows whenever ``unique_name`` gains a name: a cheap cache generation."""
        s = self._owned.get(unique_name)
        return len(s) if s is not None else 0

    def is_gone(self, unique_name: str) -> bool:
        """Whether ``unique_name`` is known to have left the bus."""
        return unique_name in self._gone

    def learn_owner(self, name: str, unique_name: str) -> None:
        """Record that ``unique_name`` owns ``name`` (e.g. from a GetNameOwner reply)."""
        if not unique_name.startswith(":") or name.startswith(":"):
            return
        if unique_name in self._gone:
            return
        self._owner[name] = unique_name
        self._owned.setdefault(unique_name, set()).add(name)

    def name_owner_changed(self, name: str, old_owner: str, new_owner: str) -> None:
        """Apply one NameOwnerChanged; idempotent and tolerant of late delivery."""
        if name.startswith(":"):
            if not new_owner and name == old_owner:
                self._unique_gone(name)
            return
        if new_owner:
            if new_owner in self._gone:
                return
            current = self._owner.get(name)
            if current is None or current == old_owner or not old_owner:
                self._owner[name] = new_owner
            self._owned.setdefault(new_owner, set()).add(name)
        elif self._owner.get(name) == old_owner:
            del self._owner[name]

    def _unique_gone(self, unique_name: str) -> None:
        if unique_name in self._gone:
            return
        self._gone[unique_name] = None
        while len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)
        names = self._owned.pop(unique_name, None)
        if names:
            for n in names:
                if self._owner.get(n) == unique_name:
                    del self._owner[n]
        for cb in self.on_unique_gone:
            cb(unique_name)

    def __len__(self) -> int:
        return len(self._owned)


_EMPTY: frozenset[str] = frozenset()
