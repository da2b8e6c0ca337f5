"""Real-client matrix through one filtered server.

gdbus (GDBus), busctl (sd-bus), dbus-send (libdbus), dbus-python (libdbus bindings) and
dbus-fast (pure Python) each call a talk peer successfully and get the right denial for a
see peer and a hidden peer, by well-known and by unique name, and see the filtered name
queries.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.filter_helpers import CLIENT_NAMES, Policy, World, runner, world_fixture
from tests.support.names import (
    ACCESS_DENIED,
    DRIVER,
    DRIVER_PATH,
    NAME_HAS_NO_OWNER,
    SERVICE_UNKNOWN,
)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    yield from world_fixture()


@pytest.fixture(scope="module")
def server(world: World) -> dict[str, str]:
    world.echo_peer("org.test.Talk")
    world.echo_peer("org.test.See")
    world.echo_peer("org.test.Hidden")
    _, address = world.add_server(
        Policy(levels={"org.test.Talk": "talk", "org.test.See": "see"}).named_arguments()
    )
    return {
        "address": address,
        "talk": world.owner("org.test.Talk"),
        "hidden": world.owner("org.test.Hidden"),
    }


ACTIONS = [
    # (id, destination, path, interface, member, signature, args, expected)
    ("talk", "org.test.Talk", "/", "org.test.Iface", "Hi", "s", ["x"], ("ok", None)),
    ("talk-unique", "@talk", "/", "org.test.Iface", "Hi", "", [], ("ok", None)),
    ("see", "org.test.See", "/", "org.test.Iface", "Hi", "", [], ("error", ACCESS_DENIED)),
    ("hidden", "org.test.Hidden", "/", "org.test.Iface", "Hi", "", [], ("error", SERVICE_UNKNOWN)),
    ("hidden-unique", "@hidden", "/", "org.test.Iface", "Hi", "", [], ("error", NAME_HAS_NO_OWNER)),
    (
        "getowner-hidden",
        DRIVER,
        DRIVER_PATH,
        DRIVER,
        "GetNameOwner",
        "s",
        ["org.test.Hidden"],
        ("error", NAME_HAS_NO_OWNER),
    ),
    (
        "hasowner-hidden",
        DRIVER,
        DRIVER_PATH,
        DRIVER,
        "NameHasOwner",
        "s",
        ["org.test.Hidden"],
        ("ok", False),
    ),
    (
        "getowner-talk",
        DRIVER,
        DRIVER_PATH,
        DRIVER,
        "GetNameOwner",
        "s",
        ["org.test.Talk"],
        ("ok", "@talk"),
    ),
    (
        "request-hidden",
        DRIVER,
        DRIVER_PATH,
        DRIVER,
        "RequestName",
        "su",
        ["org.test.Hidden", 4],
        ("error", SERVICE_UNKNOWN),
    ),
]


@pytest.mark.parametrize("client", CLIENT_NAMES)
@pytest.mark.parametrize(
    ("dest", "path", "iface", "member", "signature", "args", "expected"),
    [pytest.param(*a[1:], id=a[0]) for a in ACTIONS],
)
def test_client_matrix(
    world: World,
    server: dict[str, str],
    client: str,
    dest: str,
    path: str,
    iface: str,
    member: str,
    signature: str,
    args: list[object],
    expected: tuple[str, object],
) -> None:
    def resolve(v: object) -> object:
        return server[v[1:]] if isinstance(v, str) and v.startswith("@") else v

    outcome = runner(world, client)(
        server["address"], resolve(dest), path, iface, member, signature, [resolve(a) for a in args]
    )
    assert outcome == (expected[0], resolve(expected[1]))
