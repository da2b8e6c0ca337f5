"""The pure parts of the drop-in's restart handling: the loss notice, the anchor loop's
command line and the state it hands back (app/dropin/watch.py, anchorloop.py)."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from xdg_containers.app.dropin.anchorloop import anchor_loop_argv, parse_fd_list, parse_resume
from xdg_containers.app.dropin.backed import SERVICE, TROUBLE, ServiceBacked
from xdg_containers.app.dropin.identity import Identity
from xdg_containers.app.dropin.watch import service_lost
from xdg_containers.wire.build import build_message
from xdg_containers.wire.header import (
    FIELD_INTERFACE,
    FIELD_MEMBER,
    FIELD_PATH,
    FIELD_SENDER,
    FIELD_SIGNATURE,
    METHOD_CALL,
    SIGNAL,
)
from xdg_containers.wire.types import BodyWriter

DRIVER = "org.freedesktop.DBus"


def owner_changed(name: str, old: str, new: str, sender: str = DRIVER,
                  kind: int = SIGNAL, member: str = "NameOwnerChanged") -> bytes:
    """NameOwnerChanged as the bus sends it (or a variation)."""
    body = BodyWriter()
    for text in (name, old, new):
        body.string(text)
    fields: dict[int, str | int] = {
        FIELD_PATH: "/org/freedesktop/DBus", FIELD_INTERFACE: DRIVER, FIELD_MEMBER: member,
        FIELD_SENDER: sender, FIELD_SIGNATURE: "sss",
    }
    return build_message(kind, 7, fields, body.bytes())


def test_loss_notice_is_seen_among_other_messages() -> None:
    """The service's name losing its owner, after noise, in one read; a message not
    whole yet is left for the next read."""
    noise = owner_changed("org.example.Other", ":1.4", "")
    notice = owner_changed(SERVICE, ":1.5", "")
    assert service_lost(noise + notice) == (True, len(noise) + len(notice))
    assert service_lost(notice + noise[:20]) == (True, len(notice))
    assert service_lost(noise + notice[:30]) == (False, len(noise))
    assert service_lost(notice[30:]) == (False, len(notice) - 30)  # garbage: dropped


@pytest.mark.parametrize("msg", [
    owner_changed(SERVICE, ":1.5", ":1.9"),  # a hand-over: a new owner at once
    owner_changed(SERVICE, "", ":1.9"),
    owner_changed("org.example.Other", ":1.5", ""),
    owner_changed(SERVICE, ":1.5", "", sender=":1.77"),  # a peer's unicast imitation
    owner_changed(SERVICE, ":1.5", "", kind=METHOD_CALL),
    owner_changed(SERVICE, ":1.5", "", member="NameLost"),
    owner_changed(SERVICE, ":1.5", "")[:-3],  # not whole yet
    b"",
    b"l\x04\x01\x01" + b"\xff" * 12,  # garbage header
])
def test_no_loss_notice(msg: bytes) -> None:
    """Anything but a whole loss notice from the bus driver is no loss."""
    assert not service_lost(msg)[0]


def test_anchor_loop_argv() -> None:
    """SYNC BUS CONNECTOR... -- PATH... -- ARG..., -1 for what is absent."""
    argv = anchor_loop_argv("/f", None, 4, [6, -1], ["/p/a", "/p/b"],
                            ["--fd=5", "A", "/p/a", "B", "/p/b", "--filter"])
    assert argv == ["/f", "--anchor-loop", "-1", "4", "6", "-1", "--", "/p/a", "/p/b", "--",
                    "--fd=5", "A", "/p/a", "B", "/p/b", "--filter"]


def test_resume_state() -> None:
    """BUS,CONNECTOR... back from the loop; malformed lists are refused."""
    state = parse_resume("4,6,-1", 2, ":1.8")
    assert (state.bus_fd, state.connector_fds, state.service_name) == (4, [6, -1], ":1.8")
    assert parse_fd_list("3,-1", 2) == [3, -1]
    for text, count in (("4,6", 2), ("4,6,7,8", 2), ("4,x,6", 2), ("4,-2,6", 2), ("", 1)):
        with pytest.raises(ValueError):
            parse_resume(text, count, "")
    with pytest.raises(ValueError):
        parse_resume("-1,5", 1, "")


def test_a_request_whose_asker_is_gone_is_trouble_not_a_crash(tmp_path: Any) -> None:
    """The service asked for a (spare) connection and died before the answer: the answer
    fails with EPIPE, and the service-backed loop hands over (TROUBLE) instead of dying
    with the app's sockets."""
    target = os.path.join(str(tmp_path), "bus")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bus_listener:
        bus_listener.bind(target)
        bus_listener.listen(4)
        backed = ServiceBacked("unix:path=/unused", [], Identity())
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        bus_mine, bus_theirs = socket.socketpair()
        backed.bus, backed.connectors = bus_mine, [mine]
        theirs.send(f"unix:path={target}".encode())
        theirs.close()
        try:
            assert backed.run(None) == TROUBLE
        finally:
            backed.close()
            bus_theirs.close()
