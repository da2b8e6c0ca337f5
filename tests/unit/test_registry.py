"""Tests for xdg_containers.servers.registry.ServerRegistry with light stand-in servers/sessions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from xdg_containers.config import Limits
from xdg_containers.servers.registry import SERVER_PATH_PREFIX, LimitError, ServerRegistry


@dataclass(eq=False)
class FakeServer:
    path: str
    creator_uid: int
    creator_name: str
    listening: bool = True
    on_service_bus: bool = True


@dataclass(eq=False)
class FakeSession:
    unique_name: str | None
    server: FakeServer


class Events:
    """Records every callback the registry makes."""

    def __init__(self, reg: ServerRegistry) -> None:
        self.removed: list[Any] = []
        self.connections: list[Any] = []
        self.listening: list[Any] = []
        reg.on_removed.append(self.removed.append)
        reg.on_connections_changed.append(self.connections.append)
        reg.on_listening_changed.append(self.listening.append)


def registry(**limits: int) -> ServerRegistry:
    return ServerRegistry(Limits(**limits))


def new_server(reg: ServerRegistry, uid: int = 1000, name: str = ":1.1") -> Any:
    server: Any = FakeServer(reg.allocate_path(), uid, name)
    reg.add(server)
    return server



def with_server() -> tuple[Any, Events, Any]:
    """A registry, its recorded events and one server in it."""
    reg = registry()
    ev = Events(reg)
    return reg, ev, new_server(reg)

def test_paths_count_from_c0() -> None:
    reg = registry()
    paths = [reg.allocate_path() for _ in range(3)]
    assert paths == [
        "/org/freedesktop/DBus/Containers1/c0",
        "/org/freedesktop/DBus/Containers1/c1",
        "/org/freedesktop/DBus/Containers1/c2",
    ]
    assert SERVER_PATH_PREFIX == "/org/freedesktop/DBus/Containers1/c"


def test_paths_never_reused_after_removal() -> None:
    reg = registry()
    a = new_server(reg)
    b = new_server(reg)
    reg.server_finished(b)
    reg.server_finished(a)
    c = new_server(reg)
    assert (a.path, b.path, c.path) == (
        SERVER_PATH_PREFIX + "0",
        SERVER_PATH_PREFIX + "1",
        SERVER_PATH_PREFIX + "2",
    )


def test_add_get_iterate() -> None:
    reg = registry()
    a = new_server(reg, 1000, ":1.1")
    b = new_server(reg, 1001, ":1.2")
    assert len(reg) == 2
    assert reg.get(a.path) is a
    assert reg.get(b.path) is b
    assert reg.get(SERVER_PATH_PREFIX + "99") is None
    assert list(reg) == [a, b]


def test_iteration_is_a_snapshot() -> None:
    reg = registry()
    servers = [new_server(reg) for _ in range(3)]
    for s in reg:
        reg.server_finished(s)
    assert len(reg) == 0
    assert all(reg.get(s.path) is None for s in servers)


def test_max_servers() -> None:
    reg = registry(max_servers=2)
    new_server(reg, 1)
    new_server(reg, 2)
    with pytest.raises(LimitError, match=r"max_servers=2\b"):
        new_server(reg, 3)
    with pytest.raises(LimitError, match="already has 2 servers"):
        reg.check_can_add(4)
    assert len(reg) == 2


def test_max_servers_per_uid() -> None:
    reg = registry(max_servers_per_uid=2)
    new_server(reg, 1000)
    new_server(reg, 1000)
    with pytest.raises(
        LimitError, match=r"uid 1000 already has 2 servers \(max_servers_per_uid=2\)"
    ):
        new_server(reg, 1000)
    other = new_server(reg, 1001)
    assert reg.get(other.path) is other
    assert len(reg) == 3


def test_per_uid_count_released_on_removal() -> None:
    reg = registry(max_servers_per_uid=1)
    a = new_server(reg, 1000)
    with pytest.raises(LimitError):
        reg.check_can_add(1000)
    reg.server_finished(a)
    reg.check_can_add(1000)
    b = new_server(reg, 1000)
    assert reg.get(b.path) is b


def test_global_count_released_on_removal() -> None:
    reg = registry(max_servers=1)
    a = new_server(reg, 1)
    with pytest.raises(LimitError, match="max_servers=1"):
        reg.check_can_add(2)
    reg.server_finished(a)
    new_server(reg, 2)
    assert len(reg) == 1


def test_failed_add_leaves_no_trace() -> None:
    reg = registry(max_servers_per_uid=1)
    new_server(reg, 5)
    rejected: Any = FakeServer(reg.allocate_path(), 5, ":1.9")
    with pytest.raises(LimitError):
        reg.add(rejected)
    assert reg.get(rejected.path) is None
    assert reg.servers_created_by(":1.9") == []
    assert len(reg) == 1


def test_server_finished_is_idempotent() -> None:
    reg = registry(max_servers_per_uid=2)
    ev = Events(reg)
    a = new_server(reg, 1000)
    b = new_server(reg, 1000)
    reg.server_finished(a)
    reg.server_finished(a)
    reg.server_finished(a)
    assert ev.removed == [a]
    assert reg.get(a.path) is None
    assert reg.get(b.path) is b
    # The uid's count went down once, not three times: one more fits, two do not.
    new_server(reg, 1000)
    with pytest.raises(LimitError):
        new_server(reg, 1000)


def test_server_finished_for_unknown_server() -> None:
    reg = registry()
    ev = Events(reg)
    stranger: Any = FakeServer(SERVER_PATH_PREFIX + "7", 1000, ":1.1")
    reg.server_finished(stranger)
    assert ev.removed == []


def test_listening_changed_fires() -> None:
    reg, ev, a = with_server()
    a.listening = False
    reg.listening_changed(a)
    assert ev.listening == [a]
    assert ev.removed == []


def test_sessions() -> None:
    reg, ev, a = with_server()
    s1: Any = FakeSession(":1.50", a)
    s2: Any = FakeSession(":1.51", a)
    assert reg.is_confined(":1.50") is False
    reg.session_named(s1)
    reg.session_named(s2)
    assert ev.connections == [a, a]
    assert reg.session_for(":1.50") is s1
    assert reg.session_for(":1.51") is s2
    assert reg.session_for(":1.52") is None
    assert reg.is_confined(":1.50") is True
    assert reg.is_confined(":1.52") is False
    assert reg.is_confined(None) is False
    reg.session_closed(s1)
    assert ev.connections == [a, a, a]
    assert reg.session_for(":1.50") is None
    assert reg.is_confined(":1.50") is False
    assert reg.is_confined(":1.51") is True


def test_session_closed_twice_or_unnamed() -> None:
    reg, ev, a = with_server()
    s: Any = FakeSession(":1.60", a)
    reg.session_named(s)
    reg.session_closed(s)
    reg.session_closed(s)
    unnamed: Any = FakeSession(None, a)
    reg.session_closed(unnamed)
    assert ev.connections == [a, a]


def test_session_closed_does_not_drop_another_with_the_same_name() -> None:
    reg, ev, a = with_server()
    live: Any = FakeSession(":1.70", a)
    stale: Any = FakeSession(":1.70", a)
    reg.session_named(live)
    reg.session_closed(stale)
    assert reg.session_for(":1.70") is live
    assert ev.connections == [a]


def test_servers_created_by() -> None:
    reg = registry()
    a = new_server(reg, 1000, ":1.1")
    b = new_server(reg, 1000, ":1.2")
    c = new_server(reg, 1001, ":1.1")
    assert reg.servers_created_by(":1.1") == [a, c]
    assert reg.servers_created_by(":1.2") == [b]
    assert reg.servers_created_by(":1.3") == []
    reg.server_finished(a)
    assert reg.servers_created_by(":1.1") == [c]


def test_callbacks_in_registration_order() -> None:
    reg = registry()
    order: list[str] = []
    reg.on_removed.append(lambda s: order.append("first"))
    reg.on_removed.append(lambda s: order.append("second"))
    reg.server_finished(new_server(reg))
    assert order == ["first", "second"]


def test_sessions_on_another_bus_never_enter_the_name_table() -> None:
    """A unique name from another bus must not shadow or impersonate a peer of ours."""
    reg = ServerRegistry(Limits())
    far = FakeServer("/org/freedesktop/DBus/Containers1/c0", 0, ":1.1", on_service_bus=False)
    reg.add(far)  # type: ignore[arg-type]
    sess = FakeSession(":1.5", far)
    reg.session_named(sess)  # type: ignore[arg-type]
    assert reg.session_for(":1.5") is None
    assert not reg.is_confined(":1.5")
    reg.session_closed(sess)  # type: ignore[arg-type]
