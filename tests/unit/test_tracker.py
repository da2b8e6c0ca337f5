"""NameTracker: current owners of well-known names, fed by NameOwnerChanged (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from xdg_containers.policy.tracker import NameTracker


def test_acquire_transfer_release() -> None:
    t = NameTracker()
    t.name_owner_changed("org.a", "", ":1.1")
    assert t.owner_of("org.a") == ":1.1"
    t.name_owner_changed("org.a", ":1.1", ":1.2")
    assert t.owner_of("org.a") == ":1.2"
    t.name_owner_changed("org.a", ":1.2", "")
    assert t.owner_of("org.a") is None
    assert len(t) == 0


def test_a_departure_drops_every_name_the_peer_owned_and_only_those() -> None:
    t = NameTracker()
    gone: list[str] = []
    t.on_unique_gone.append(gone.append)
    t.name_owner_changed("org.a", "", ":1.1")
    t.learn_owner("org.b", ":1.1")
    t.name_owner_changed("org.c", "", ":1.2")
    t.name_owner_changed(":1.1", ":1.1", "")
    assert (t.owner_of("org.a"), t.owner_of("org.b"), t.owner_of("org.c")) == (None, None, ":1.2")
    assert t.is_gone(":1.1") and gone == [":1.1"]
    t.name_owner_changed(":1.1", ":1.1", "")  # told twice: nothing more happens
    assert gone == [":1.1"]


def test_late_news_about_a_departed_peer_is_ignored() -> None:
    t = NameTracker()
    t.name_owner_changed(":1.1", ":1.1", "")
    t.learn_owner("org.a", ":1.1")
    t.name_owner_changed("org.b", "", ":1.1")
    assert t.owner_of("org.a") is None and t.owner_of("org.b") is None


def test_unique_names_and_non_unique_owners_are_not_recorded() -> None:
    t = NameTracker()
    t.learn_owner(":1.5", ":1.5")
    t.learn_owner("org.a", "org.b")
    t.name_owner_changed(":1.5", "", ":1.5")
    assert len(t) == 0


class _Model:
    """The tracker's rules written out plainly, to compare against."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}
        self.gone: set[str] = set()

    def learn(self, name: str, unique: str) -> None:
        if unique.startswith(":") and not name.startswith(":") and unique not in self.gone:
            self.owner[name] = unique

    def change(self, name: str, old: str, new: str) -> None:
        if name.startswith(":"):
            if not new and name == old and name not in self.gone:
                self.gone.add(name)
                self.owner = {n: o for n, o in self.owner.items() if o != name}
            return
        if new:
            if new in self.gone:
                return
            current = self.owner.get(name)
            if current is None or current == old or not old:
                self.owner[name] = new
        elif self.owner.get(name) == old:
            del self.owner[name]


_names = st.sampled_from(["org.a", "org.b", "org.c", "org.d"])
_uniques = st.sampled_from([":1.1", ":1.2", ":1.3"])
_events = st.lists(
    st.one_of(
        st.tuples(st.just("learn"), _names, _uniques),
        st.tuples(st.just("acquire"), _names, _uniques),
        st.tuples(st.just("transfer"), _names, st.tuples(_uniques, _uniques)),
        st.tuples(st.just("release"), _names, _uniques),
        st.tuples(st.just("leave"), _uniques, _uniques),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(_events)
def test_the_tracker_agrees_with_the_plain_rules(events: list[tuple[str, str, object]]) -> None:
    t, m = NameTracker(), _Model()
    for kind, name, arg in events:
        if kind == "learn":
            assert isinstance(arg, str)
            t.learn_owner(name, arg)
            m.learn(name, arg)
            continue
        if kind == "acquire":
            args = (name, "", arg)
        elif kind == "transfer":
            assert isinstance(arg, tuple)
            args = (name, arg[0], arg[1])
        elif kind == "release":
            args = (name, arg, "")
        else:
            args = (name, name, "")
        t.name_owner_changed(*args)  # type: ignore[arg-type]
        m.change(*args)  # type: ignore[arg-type]
        assert dict(t.owners()) == m.owner
        for unique in (":1.1", ":1.2", ":1.3"):
            assert t.is_gone(unique) == (unique in m.gone)
