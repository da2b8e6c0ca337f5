"""Log=true logs every message; denials are always logged, rate-limited."""

from __future__ import annotations

import asyncio

from dbus_fast import Variant

from tests.conftest import ServiceProcess, add_server, call, connect, error, ok
from tests.support.names import FILTER

LOG = "org.freedesktop.XdgContainers1.Log"


async def test_log_true_logs_each_message_with_its_verdict(
    service: ServiceProcess, manager_bus
):  # type: ignore[no-untyped-def]
    path, res = await add_server(
        manager_bus, app_id="org.example.Logged",
        named={LOG: Variant("b", True), FILTER: Variant("b", True)},
    )
    client = await connect(res["Address"].value)
    try:
        ok(await call(client, "GetId", destination="org.freedesktop.DBus",
                      path="/org/freedesktop/DBus", interface="org.freedesktop.DBus"))
        error(await call(client, "Frob", destination="org.example.Hidden", path="/"),
              "ServiceUnknown")
        log = service.wait_for_log("member=Frob verdict=deny")
        lines = [line for line in log.splitlines() if f"{path} {client.unique_name}" in line]
        assert any("dir=C->B type=call" in ln and "member=GetId verdict=pass" in ln
                   for ln in lines)
        assert any("dir=B->C type=return" in ln and "verdict=pass" in ln for ln in lines)
        assert any("dir=C->B type=call" in ln and "dest=org.example.Hidden" in ln
                   and "member=Frob verdict=deny reason=" in ln for ln in lines)
    finally:
        client.disconnect()


async def test_without_log_only_denials_are_logged_and_rate_limited(
    service: ServiceProcess, manager_bus
):  # type: ignore[no-untyped-def]
    path, res = await add_server(
        manager_bus, app_id="org.example.Quiet", named={FILTER: Variant("b", True)}
    )
    client = await connect(res["Address"].value)
    try:
        ok(await call(client, "GetId", destination="org.freedesktop.DBus",
                      path="/org/freedesktop/DBus", interface="org.freedesktop.DBus"))
        replies = await asyncio.gather(
            *(call(client, f"Frob{i}", destination="org.example.Hidden", path="/")
              for i in range(200))
        )
        for r in replies:
            error(r, "ServiceUnknown")
        log = service.wait_for_log("Frob0")
        assert "GetId" not in log, "allowed traffic must not be logged without Log"
        denials = [ln for ln in log.splitlines()
                   if f"{path} (org.example.Quiet)" in ln and "deny" in ln]
        # Logged with server path and app id, but a flood is cut to a burst.
        assert 1 <= len(denials) <= 20, len(denials)
        props = ok(await call(manager_bus, "Get", "ss",
                              ["org.freedesktop.DBus.Containers1.Server", "MessagesDenied"],
                              path=path, interface="org.freedesktop.DBus.Properties"))
        assert props[0].value >= 200
    finally:
        client.disconnect()
