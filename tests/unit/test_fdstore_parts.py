"""The fd store's pure parts: names, systemd's environment, the keeper's packets, the
bytes the keeper sends the bus, and the exact datagrams the systemd backend sends."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from xdg_containers.config import Limits
from xdg_containers.service import fdproto
from xdg_containers.service.fdkeeperlink import activation_bytes, bus_sockaddr
from xdg_containers.service.fdstore import check_name, open_fd_store
from xdg_containers.service.fdsystemd import (
    SystemdFdStore,
    inherited_from_env,
    notify_address,
)
from xdg_containers.wire.address import AddressError
from xdg_containers.wire.build import error_reply, method_return
from xdg_containers.wire.header import message_length, parse_header


@pytest.mark.parametrize("name", ["c5.listen", "c5.connector", "c5.notify", "a-b_C.9",
                                  "x" * 255, "."])
def test_names_of_ours_pass(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize("name", ["", "x" * 256, "c5:listen", "c5 listen", "c5/listen",
                                  "c\u00e9", "c5\nFDSTORE=1", "c5=x"])
def test_other_names_are_refused_saying_what_is_allowed(name: str) -> None:
    with pytest.raises(ValueError, match="ASCII letters, digits"):
        check_name(name)


def test_listen_fds_for_us_start_at_3_with_their_names() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a:b:c"}
    assert inherited_from_env(env, 42) == ([("a", 3), ("b", 4), ("c", 5)], [])


def test_listen_fds_missing_names_are_unknown() -> None:
    env = {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}
    assert inherited_from_env(env, 7) == ([("a", 3), ("unknown", 4)], [])
    assert inherited_from_env({"LISTEN_PID": "7", "LISTEN_FDS": "1"}, 7) == (
        [("unknown", 3)], [])


def test_listen_fds_of_another_pid_or_garbage_are_not_taken() -> None:
    assert inherited_from_env({}, 7) == ([], [])
    pairs, problems = inherited_from_env({"LISTEN_PID": "8", "LISTEN_FDS": "1"}, 7)
    assert pairs == [] and "not ours" in problems[0]
    pairs, problems = inherited_from_env({"LISTEN_PID": "7", "LISTEN_FDS": "x"}, 7)
    assert pairs == [] and "not a number" in problems[0]
    pairs, problems = inherited_from_env({"LISTEN_PID": "7", "LISTEN_FDS": "-1"}, 7)
    assert pairs == [] and "out of range" in problems[0]


def test_notify_socket_path_or_abstract() -> None:
    assert notify_address("/run/user/1000/systemd/notify") == "/run/user/1000/systemd/notify"
    assert notify_address("@/org/freedesktop/systemd1/notify/123") == (
        b"\0/org/freedesktop/systemd1/notify/123")
    with pytest.raises(ValueError, match="neither an absolute path nor @abstract"):
        notify_address("relative/notify")


def test_keeper_packets_parse_strictly() -> None:
    assert fdproto.parse_fields(b"FDSTORE=1\nFDNAME=c1.listen\n") == {
        "FDSTORE": "1", "FDNAME": "c1.listen"}
    for bad in (b"FDSTORE", b"fdstore=1", b"FDNAME=a\nFDNAME=b", b"=1"):
        with pytest.raises(ValueError):
            fdproto.parse_fields(bad)
    with pytest.raises(UnicodeDecodeError):
        fdproto.parse_fields(b"FDNAME=\xff")


def test_activation_bytes_are_sasl_hello_and_start_service_by_name() -> None:
    data = activation_bytes(1000)
    sasl, _, messages = data.partition(b"BEGIN\r\n")
    assert sasl == b"\0AUTH EXTERNAL 31303030\r\n"
    hello_len = message_length(messages)
    hello, call = parse_header(messages[:hello_len]), parse_header(messages[hello_len:])
    assert (hello.member, hello.serial, hello.destination) == ("Hello", 1, "org.freedesktop.DBus")
    assert (call.member, call.serial, call.signature) == ("StartServiceByName", 2, "su")
    body = messages[hello_len + call.body_offset :]
    assert body == struct.pack("<I", 32) + b"org.freedesktop.DBus.Containers1\0" + b"\0" * 3 + (
        struct.pack("<I", 0))


def test_reply_outcome_reads_the_answer_to_serial_2() -> None:
    hello_reply = method_return(1, 1, "org.freedesktop.DBus", ":1.5", "s",
                                struct.pack("<I", 4) + b":1.5\0" + b"\0" * 3)
    ok = method_return(2, 2, "org.freedesktop.DBus", ":1.5", "u", struct.pack("<I", 1))
    failed = error_reply(3, 2, ":1.5", "org.freedesktop.DBus.Error.Spawn.ChildExited", "no")
    start = b"OK 1234567890abcdef\r\n"
    assert fdproto.reply_outcome(start + hello_reply, 2) is None
    assert fdproto.reply_outcome(start + hello_reply + ok[:20], 2) is None
    assert fdproto.reply_outcome(start + hello_reply + ok, 2) == "started"
    assert fdproto.reply_outcome(start + hello_reply + failed, 2) == (
        "failed: org.freedesktop.DBus.Error.Spawn.ChildExited")
    assert "refused" in str(fdproto.reply_outcome(b"REJECTED EXTERNAL\r\n", 2))


def test_bus_sockaddr_takes_the_first_unix_entry() -> None:
    assert bus_sockaddr("unix:path=/run/a%20b,guid=00") == b"/run/a b"
    assert bus_sockaddr("tcp:host=h,port=1;unix:abstract=/tmp/x") == b"\0/tmp/x"
    with pytest.raises(AddressError, match="no unix:path= or unix:abstract="):
        bus_sockaddr("tcp:host=localhost,port=1")


@pytest.fixture
def manager(tmp_path: os.PathLike[str]) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing where systemd's notify socket would."""
    path = os.path.join(tmp_path, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def datagram(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One notify datagram and its fds."""
    data, fds, _flags, _ = socket.recv_fds(sock, 4096, 16)
    return data, fds


def test_systemd_store_sends_remove_then_store_with_the_fd(
    manager: tuple[socket.socket, str],
) -> None:
    """Names are unique in ours, not in systemd's: each store first removes the name."""
    sock, path = manager
    store = SystemdFdStore(path)
    kept = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with kept:
        store.store("c1.listen", kept.fileno())
        assert datagram(sock) == (b"FDSTOREREMOVE=1\nFDNAME=c1.listen", [])
        data, fds = datagram(sock)
        assert data == b"FDSTORE=1\nFDNAME=c1.listen" and len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(kept.fileno()).st_ino
        os.close(fds[0])
    store.store("c2.listen", 0)
    datagram(sock)
    os.close(datagram(sock)[1][0])
    store.remove("c1.listen")
    assert datagram(sock) == (b"FDSTOREREMOVE=1\nFDNAME=c1.listen", [])
    store.close()
    assert datagram(sock) == (b"FDSTOREREMOVE=1\nFDNAME=c2.listen", [])


def test_systemd_store_failures_are_logged_once_and_never_raise(
    tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture,
) -> None:
    store = SystemdFdStore(os.path.join(tmp_path, "nobody-listens"))
    with caplog.at_level(logging.WARNING):
        for name in ("a", "b", "c"):
            store.store(name, 0)
        store.remove("a")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "No such file or directory" in lines[0], lines
    with pytest.raises(ValueError):
        store.store("bad name", 0)
    store.close()


def test_open_fd_store_says_why_there_is_none(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ValueError, match="alphanumeric"):
        open_fd_store("a/b")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/notify")
    monkeypatch.setenv("FDSTORE", "0")
    with caplog.at_level(logging.WARNING):
        assert open_fd_store("abc") is None
        monkeypatch.delenv("FDSTORE")
        monkeypatch.setenv("NOTIFY_SOCKET", "notify")
        assert open_fd_store("abc") is None
        monkeypatch.delenv("NOTIFY_SOCKET")
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        assert open_fd_store("abc") is None
    text = caplog.text
    assert "FileDescriptorStoreMax=0" in text and "neither an absolute path" in text
    assert "XDG_RUNTIME_DIR is not set" in text


UNIT = Path(__file__).resolve().parents[2] / "data/systemd/user/xdg-containers.service.in"


def test_the_user_unit_keeps_an_fd_store_big_enough_and_restarts_on_failure() -> None:
    """Three fds per server for max_servers servers fit in FileDescriptorStoreMax=; a crash
    restarts the service (which gets the store back); the replacement may notify."""
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines()
        if line and line[0] not in "#;[" and "=" in line
    )
    assert int(settings["FileDescriptorStoreMax"]) >= 3 * Limits().max_servers
    assert settings["Restart"] == "on-failure"
    assert settings["NotifyAccess"] == "all"
    assert settings["ExecReload"] == "@bindir@/xdg-containers serve --replace --detach"
