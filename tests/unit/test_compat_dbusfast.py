"""Canaries for xdg_containers/compat/dbusfast.py: each fails naming the dbus-fast API that
changed. The suite runs them against the oldest (1.84.2) and newest supported dbus-fast."""

from __future__ import annotations

import asyncio
import gc
import os
import re
from pathlib import Path
from typing import Any

import dbus_fast.service
import pytest
from dbus_fast import Variant
from dbus_fast._private.marshaller import Marshaller
from dbus_fast.introspection import Node
from dbus_fast.service import ServiceInterface

from xdg_containers.compat import dbusfast
from xdg_containers.compat.dbusfast import (
    complete_types,
    connect_bus,
    dbus_method,
    dbus_property,
    dbus_signal,
    members,
)
from xdg_containers.service import ManagerInterface, ServerObject
from xdg_containers.service.checks import metadata_size
from xdg_containers.service.introspection import interface_element, node_xml

PACKAGE = Path(__file__).resolve().parents[2] / "xdg_containers"


class _Sample(ServiceInterface):
    @dbus_method("sa{sv}", "oas")
    def Two(self, name: str, options: dict[str, Variant]) -> list[Any]:
        return ["/x", [name]]

    @dbus_method()
    async def Nothing(self) -> None:
        return None

    @dbus_signal("o")
    def Gone(self, path: str) -> str:
        return path

    @dbus_property("t", emits_changed="false")
    def Count(self) -> int:
        return 7


def test_decorator_names() -> None:
    """method/signal were renamed dbus_method/dbus_signal in 2.46; we use the newest."""
    has_new = hasattr(dbus_fast.service, "dbus_method")
    assert has_new or hasattr(dbus_fast.service, "method"), (
        "dbus_fast.service has neither dbus_method (>= 2.46) nor method (< 2.46)"
    )
    expected = dbus_fast.service.dbus_method if has_new else dbus_fast.service.method
    assert dbusfast._METHOD is expected
    expected_sig = dbus_fast.service.dbus_signal if has_new else dbus_fast.service.signal
    assert dbusfast._SIGNAL is expected_sig
    assert callable(dbus_fast.service.dbus_property), "dbus_fast.service.dbus_property is gone"


def test_dbus_fast_reads_signatures_from_dunder_signature() -> None:
    """Our decorators hand dbus-fast string annotations through ``__signature__``:
    ServiceInterface.introspect() must show them."""
    iface = _Sample("org.example.Sample").introspect()
    got = {m.name: ("".join(a.signature for a in m.in_args),
                    "".join(a.signature for a in m.out_args)) for m in iface.methods}
    assert got == {"Two": ("sa{sv}", "oas"), "Nothing": ("", "")}, (
        "dbus_fast.service method decorator no longer takes signature strings from "
        f"inspect.signature(fn) (got {got})"
    )
    assert [(s.name, [a.signature for a in s.args]) for s in iface.signals] == [("Gone", ["o"])]
    assert [(p.name, p.signature) for p in iface.properties] == [("Count", "t")], (
        "dbus_fast.service.dbus_property no longer takes its type from inspect.signature(fn)"
    )


def test_members_are_our_own_table() -> None:
    table = {(m.kind, m.name): (m.in_signature, m.out_signature, m.annotations)
             for m in members(_Sample)}
    assert table == {
        ("method", "Two"): ("sa{sv}", "oas", ()),
        ("method", "Nothing"): ("", "", ()),
        ("signal", "Gone"): ("", "o", ()),
        ("property", "Count"): (
            "", "t", (("org.freedesktop.DBus.Property.EmitsChangedSignal", "false"),)),
    }
    assert [m.name for m in members(ServerObject) if m.kind == "method"] == [
        "Stop", "StopListening", "SetPolicy"]
    assert "AddServer" in {m.name for m in members(ManagerInterface)}


def test_wrong_parameter_count_is_refused() -> None:
    with pytest.raises(TypeError, match="1 parameters for signature 'ss'"):
        @dbus_method("ss")
        def Bad(self: Any, one: str) -> None:
            pass


def test_complete_types() -> None:
    """dbus_fast.SignatureTree(...).types[i].signature splits a signature into types."""
    assert complete_types("sa{sv}(ii)ay") == ["s", "a{sv}", "(ii)", "ay"]
    with pytest.raises(ValueError, match="invalid D-Bus signature"):
        complete_types("a{")


def test_node_default_and_to_xml() -> None:
    """dbus_fast.introspection.Node.default(path).to_xml() gives the standard interfaces."""
    root = Node.default("/p").to_xml()
    names = {i.get("name") for i in root.findall("interface")}
    assert {"org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Properties",
            "org.freedesktop.DBus.Peer"} <= names, names
    xml = node_xml("/p", [_Sample("org.example.Sample")], ["c2", "c1"])
    assert xml.startswith("<!DOCTYPE node")
    assert re.search(r'<property name="Count" type="t" access="read"><annotation '
                     r'name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="false" ?/>',
                     xml), xml
    assert xml.index('<node name="c1"') < xml.index('<node name="c2"')
    el = interface_element("org.example.Sample", _Sample)
    assert [a.get("type") for a in el.find("method[@name='Two']") or []] == ["s", "a{sv}", "o",
                                                                           "as"]


@pytest.mark.parametrize("metadata", [
    {},
    {"a": Variant("s", "x")},
    {"k": Variant("ay", b"\x00\x01"), "n": Variant("t", 5), "b": Variant("b", True)},
    {"d": Variant("a{sv}", {"x": Variant("(is)", [1, "z"])}), "g": Variant("g", "a{sv}"),
     "o": Variant("o", "/a/b"), "l": Variant("as", ["p", "qq"]), "y": Variant("y", 3),
     "v": Variant("v", Variant("d", 1.5)), "q": Variant("aq", [1, 2, 3])},
])
def test_metadata_size_matches_the_marshaller(metadata: dict[str, Variant]) -> None:
    """Our public-API size of an a{sv} equals what dbus-fast marshals."""
    expected = len(Marshaller("a{sv}", [metadata]).marshall())
    assert metadata_size("", "", "", metadata) == expected


async def test_connect_bus_raises_from_one_call_and_leaks_no_fd(tmp_path: Path) -> None:
    """MessageBus() connected in its constructor before 5.0: connect_bus hides that."""
    async def attempt() -> str:
        try:
            await asyncio.wait_for(connect_bus(f"unix:path={tmp_path}/nobody"), 10)
        except Exception as exc:  # which one differs between releases
            return type(exc).__name__
        return "connected"

    gc.collect()  # what earlier tests left for collection goes before counting
    before = len(os.listdir("/proc/self/fd"))
    assert await attempt() != "connected"
    gc.collect()  # an old constructor's socket is closed when collected
    assert len(os.listdir("/proc/self/fd")) == before


def test_package_uses_only_public_dbus_fast_and_asyncio_outside_compat() -> None:
    """Every private or version-specific dependency API lives in xdg_containers/compat/."""
    private = re.compile(
        r"dbus_fast\._|\._private\b|\._as_message\b|\._get_methods\b|_introspect_export_path"
        r"|\._bus_address\b|_msg_body_to_args|\bAnnotated\[|dbus_fast\.annotations"
        r"|\bMessageBus\(|\bloop\._\w+|\._(ready|scheduled|stopping|fd_to_key)\b|selectors\.EpollSelector\)|\"_selector\""
    )
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "compat" in path.relative_to(PACKAGE).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if private.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "private/version-specific API outside compat/:\n" + "\n".join(
        offenders)



def _fds_read(sock_for_reader: Any, sender: Any) -> int:
    """How many fds dbus-fast's reader takes from one message that carries two."""
    import array
    import socket

    from dbus_fast import Message

    from tests.support.dbusfast import unmarshaller

    r1, w1 = os.pipe()
    try:
        msg = Message(path="/p", interface="org.example.I", member="M", signature="hh",
                      body=[0, 1], unix_fds=[r1, w1])
        raw = bytes(msg._marshall(True))  # type: ignore[attr-defined]
        sender.sendmsg([raw], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r1, w1]))])
    finally:
        os.close(r1)
        os.close(w1)
    got = unmarshaller(None, sock_for_reader).unmarshall()
    for fd in got.unix_fds:
        os.close(fd)
    return len(got.unix_fds)


def test_fd_room_canary() -> None:
    """Before 3.0 dbus-fast's reader (``Unmarshaller`` reading with ``recvmsg``) keeps only
    the first fd of a message; connect_bus's socket makes room for all, through
    ``MessageBus._sock``, which the constructor made (checked in the next test)."""
    import socket

    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        plain = _fds_read(a, b)
        widened = _fds_read(dbusfast._RoomForFds(a), b)
    version = dbusfast.dbus_fast_version()
    assert widened == 2, f"dbus-fast {version}: the widened reader took {widened} of 2 fds"
    if dbusfast.needs_fd_room():
        assert plain == 1, f"dbus-fast {version} reads {plain} of 2 fds: lower MANY_FDS_SINCE"
    else:
        assert plain == 2, (
            f"dbus-fast {version}: dbus_fast._private.unmarshaller reads {plain} of 2 fds per "
            "message: raise MANY_FDS_SINCE")


async def test_message_bus_sock_canary(tmp_path: Path) -> None:
    """Before 3.0 connect_bus widens ``MessageBus._sock``: the constructor must make it."""
    import socket

    from dbus_fast.aio import MessageBus

    if not dbusfast.needs_fd_room():
        return  # nothing is widened: the reader has room itself (test above)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "bus"))
    listener.listen()
    with listener:
        bus = MessageBus(bus_address=f"unix:path={tmp_path}/bus", negotiate_unix_fd=True)
        sock = getattr(bus, "_sock", None)
        assert isinstance(sock, socket.socket), (
            f"dbus-fast {dbusfast.dbus_fast_version()}: MessageBus._sock is {sock!r} after the "
            "constructor; connect_bus cannot give the reader room for several fds"
        )
        sock.close()


def test_text_canary() -> None:
    """Before 2.12 dbus-fast's marshaller (``Marshaller._write_string``) writes a string's
    length in characters; connect_bus then guards ``send`` (ascii_safe)."""
    wrong = Marshaller("s", ["\u00e9"]).marshall()[:4] == b"\x01\0\0\0"
    version = dbusfast.dbus_fast_version()
    if dbusfast.text_ok():
        assert not wrong, f"dbus-fast {version} marshals 'é' with length 1: raise TEXT_OK_SINCE"
    else:
        assert wrong, f"dbus-fast {version} marshals non-ASCII right: lower TEXT_OK_SINCE"
        assert dbusfast.limitations() and "non-ASCII" in dbusfast.limitations()[0]


def test_ascii_safe() -> None:
    from dbus_fast import Message, MessageType

    call = Message(destination=":1.5", path="/p", interface="org.example.I", member="M",
                   serial=9)
    fine = Message.new_method_return(call, "a{sv}", [{"k": Variant("s", "plain")}])
    assert dbusfast.ascii_safe(fine) is fine
    reply = dbusfast.ascii_safe(
        Message.new_method_return(call, "a{sv}", [{"k": Variant("as", ["caf\u00e9"])}]))
    assert reply is not None and reply.message_type == MessageType.ERROR
    assert reply.error_name == "org.freedesktop.DBus.Error.Failed"
    assert reply.reply_serial == 9 and "non-ASCII" in reply.body[0]
    err = dbusfast.ascii_safe(Message.new_error(call, "org.example.E", "bad 'caf\u00e9'"))
    assert err is not None and err.body == ["bad 'caf\\xe9'"] and err.error_name == "org.example.E"
    signal = Message.new_signal("/p", "org.example.I", "S", "s", ["\u00e9"])
    assert dbusfast.ascii_safe(signal) is None


def test_redispatch_finds_the_buses_message_processing() -> None:
    """redispatch() relies on MessageBus._process_message (what dbus-fast's reader calls)."""
    from dbus_fast.aio import MessageBus

    assert callable(getattr(MessageBus, "_process_message", None)), (
        "dbus-fast: MessageBus._process_message is gone; compat.redispatch must change")


def test_keep_message_gives_the_message_an_fd_list_of_its_own() -> None:
    """A kept message must not share the reader's fd list (see keep_message)."""
    from dbus_fast import Message

    from xdg_containers.compat.dbusfast import keep_message

    shared: list[int] = []
    msg = Message(destination="a.b", path="/", interface="a.b", member="X")
    msg.unix_fds = shared
    assert keep_message(msg) is msg
    shared.extend([7, 8])  # what the reader does with the next message's fds
    assert msg.unix_fds == []
