"""What a confined app learns from the service's read-only methods, asked the way an app
would: ``xdg-containers list/info/identify`` run with ``--address`` set to its minted socket
(docs/interface.md, "Calls from confined connections")."""

from __future__ import annotations

import json

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from tests.conftest import ServiceProcess, add_server, call, connect, error, ok
from tests.integration.test_cli_common import cli

pytestmark = pytest.mark.timeout(90)

EXT = "org.freedesktop.XdgContainers1."
PROPS = "org.freedesktop.DBus.Properties"
IFACE = "org.freedesktop.DBus.Containers1"
SERVER_IFACE = "org.freedesktop.DBus.Containers1.Server"
FILTER = {EXT + "Filter": Variant("b", True)}
#: The three ways an app's socket can be set up: identify only; filtered with the service
#: not in the policy (its name is then invisible, but for the three questions about the
#: app itself); filtered with ``talk`` to the service.
MODES = {
    "identify-only": {},
    "filtered": FILTER,
    "filtered-talk": {**FILTER, EXT + "Policy": Variant("a{ss}", {IFACE: "talk"})},
}


@pytest.mark.parametrize("mode", sorted(MODES))
async def test_confined_app_learns_nothing_of_other_instances(
    service: ServiceProcess, manager_bus: MessageBus, mode: str
) -> None:
    """Through its own socket an app lists and reads at most its own instance; another
    instance's path, metadata and connections are AccessDenied (or the service is not
    even visible), never answered."""
    mine, res = await add_server(manager_bus, app_id="org.example.Mine", named=MODES[mode])
    other, other_res = await add_server(
        manager_bus, app_id="org.example.Other", metadata={"org.example.S": Variant("s", "hush")}
    )
    address = res["Address"].value
    neighbour = await connect(other_res["Address"].value)  # another instance's connection
    try:
        listed = await cli("list", "--json", "--address", address)
        if mode == "filtered":
            # ListServers and the properties are not among the three calls a filtered app
            # may make without the service in its policy: the name looks unowned.
            assert listed.returncode == 3, (listed.returncode, listed.stderr)
        else:
            assert listed.returncode == 0, listed.stderr
            data = json.loads(listed.stdout)
            assert [s["Path"] for s in data] == [mine]
            assert data[0]["AppID"] == "org.example.Mine"
        assert "hush" not in listed.stdout and "org.example.Other" not in listed.stdout

        for argv in (("info", other), ("identify", neighbour.unique_name)):
            r = await cli(*argv, "--address", address)
            assert r.returncode == 1, (argv, r.returncode, r.stderr)
            assert "AccessDenied" in r.stderr and "its own" in r.stderr, r.stderr
            assert "hush" not in r.stderr and r.stdout == ""

        app = await connect(address)
        try:
            # About itself, every mode answers.
            info = ok(await call(app, "GetServerInfo", "o", [mine]))
            assert info[2] == "org.example.Mine"
            creds = ok(await call(app, "GetConnectionCredentials", "s", [app.unique_name]))[0]
            assert creds["org.freedesktop.DBus.Containers1.Path"].value == mine
            assert ok(await call(app, "GetConnectionInfo", "s", [app.unique_name]))[0] == mine
            error(await call(app, "GetServerInfo", "o", [other + "9"]), "AccessDenied")
            # SupportedArguments describes the service, not an instance.
            supported = await call(app, "Get", "ss", [IFACE, "SupportedArguments"],
                                   interface=PROPS)
            if mode == "filtered":
                error(supported, "ServiceUnknown")
            else:
                assert "StopOnDisconnect" in ok(supported)[0].value
                error(await call(app, "GetAll", "s", [SERVER_IFACE], path=other,
                                 interface=PROPS), "AccessDenied")
        finally:
            app.disconnect()

        # The unconfined admin, on the real bus, sees both.
        admin = await cli("list", "--json")
        assert sorted(s["Path"] for s in json.loads(admin.stdout)) == sorted([mine, other])
    finally:
        neighbour.disconnect()
