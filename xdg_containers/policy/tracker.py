"""Who owns which well-known bus name right now, service-wide (pure).

Fed by NameOwnerChanged from the owner-change feed (io/ownerfeed.py) and, in order
with each filtered client's stream, by the NameOwnerChanged signals that
stream carries; applying a change twice is harmless. Each filtered connection
takes a snapshot of it when the client says Hello and keeps its own sticky
history from then on (see PolicyFilter), as xdg-dbus-proxy does per client.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

#: Unique names remembered after they left, so late news about them is ignored.
_GONE_MEMORY = 8192


class NameTracker:
    """Current owners of well-known names, and which unique names left the bus."""

    def __init__(self) -> None:
        """Start knowing nothing; feed ``name_owner_changed`` and ``learn_owner``."""
        self._owner: dict[str, str] = {}
        # The reverse of _owner, so a departure costs what the peer owned, not every name.
        self._owned_by: dict[str, set[str]] = {}
        self._gone: OrderedDict[str, None] = OrderedDict()
        self.on_unique_gone: list[Callable[[str], None]] = []

    def owner_of(self, name: str) -> str | None:
        """The unique name owning ``name`` now, if known."""
        return self._owner.get(name)

    def owners(self) -> Iterator[tuple[str, str]]:
        """Every (well-known name, owner) pair known now."""
        return iter(list(self._owner.items()))

    def is_gone(self, unique_name: str) -> bool:
        """Whether ``unique_name`` is known to have left the bus."""
        return unique_name in self._gone

    def learn_owner(self, name: str, unique_name: str) -> None:
        """Record that ``unique_name`` owns ``name`` (start-up scan, GetNameOwner)."""
        if not unique_name.startswith(":") or name.startswith(":"):
            return
        if unique_name in self._gone:
            return
        self._set_owner(name, unique_name)

    def _set_owner(self, name: str, unique_name: str) -> None:
        previous = self._owner.get(name)
        if previous == unique_name:
            return
        if previous is not None:
            self._drop_owner(name, previous)
        self._owner[name] = unique_name
        self._owned_by.setdefault(unique_name, set()).add(name)

    def _drop_owner(self, name: str, unique_name: str) -> None:
        del self._owner[name]
        names = self._owned_by.get(unique_name)
        if names is not None:
            names.discard(name)
            if not names:
                del self._owned_by[unique_name]

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
                self._set_owner(name, new_owner)
        elif self._owner.get(name) == old_owner:
            self._drop_owner(name, old_owner)

    def _unique_gone(self, unique_name: str) -> None:
        if unique_name in self._gone:
            return
        self._gone[unique_name] = None
        while len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)
        for n in self._owned_by.pop(unique_name, ()):
            del self._owner[n]
        for cb in self.on_unique_gone:
            cb(unique_name)

    def __len__(self) -> int:
        return len(self._owner)
