"""Pure parts of the anchors (SPEC 10): answers checked, requests built, identity files."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from xdg_containers.anchor.program import sockaddrs_of, unescape
from xdg_containers.anchor.sandbox import identity_path, identity_text
from xdg_containers.io.anchor_link import (
    AnchorError,
    AnchorLink,
    anchor_request,
    check_upstream_socket,
    parse_answer,
    request_address,
)


def _connected_stream() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def test_a_connected_stream_socket_is_accepted() -> None:
    a, b = _connected_stream()
    sock = parse_answer(b"\x00", [os.dup(a.fileno())], truncated=False)
    assert sock.type == socket.SOCK_STREAM and not sock.getblocking()
    sock.close()
    a.close()
    b.close()


def _one_of_pair(kind: int) -> socket.socket:
    """One end of a socket pair of that type, the other end closed (not left to the gc)."""
    mine, other = socket.socketpair(socket.AF_UNIX, kind)
    other.close()
    return mine


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: _one_of_pair(socket.SOCK_DGRAM), "SOCK_STREAM"),
        (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), "not connected"),
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "AF_UNIX"),
    ],
)
def test_other_sockets_are_refused_and_closed(make: object, words: str) -> None:
    sock = make()  # type: ignore[operator]
    fd = os.dup(sock.fileno())
    sock.close()
    with pytest.raises(AnchorError, match=words):
        check_upstream_socket(fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_a_listening_socket_is_refused() -> None:
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(b"\0xdgc-unit-listening-" + str(os.getpid()).encode())
    lst.listen(1)
    with pytest.raises(AnchorError, match="listening"):
        check_upstream_socket(os.dup(lst.fileno()))
    lst.close()


def test_a_pipe_is_refused() -> None:
    r, w = os.pipe()
    with pytest.raises(AnchorError, match="not a socket"):
        check_upstream_socket(r)
    os.close(w)


@pytest.mark.parametrize(
    "data, nfds, truncated, words",
    [
        (b"\x00", 0, False, "0 fds"),
        (b"\x00", 2, False, "2 fds"),
        (b"\x01no bus", 0, False, "could not connect: no bus"),
        (b"\x07junk", 1, False, "malformed"),
        (b"", 0, False, "malformed"),
        (b"\x00", 1, True, "more fds"),
    ],
)
def test_bad_answers_fail_and_close_every_fd(
    data: bytes, nfds: int, truncated: bool, words: str
) -> None:
    pairs = [_connected_stream() for _ in range(nfds)]
    fds = [os.dup(a.fileno()) for a, _b in pairs]
    with pytest.raises(AnchorError, match=words):
        parse_answer(data, fds, truncated)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    for a, b in pairs:
        a.close()
        b.close()


def test_requests_name_the_unix_entries_in_order() -> None:
    assert request_address("/run/user/1/bus") == "unix:path=/run/user/1/bus"
    assert request_address(b"\0/tmp/dbus-x") == "unix:abstract=/tmp/dbus-x"
    assert request_address("/a b") == "unix:path=/a%20b"
    both = "tcp:host=h,port=1;unix:path=/x,guid=00;unix:abstract=y"
    assert anchor_request(both) == "unix:path=/x,guid=00;unix:abstract=y"
    assert sockaddrs_of(anchor_request(both)) == ["/x", b"\0y"]
    assert unescape("/a%20b%2c") == "/a b,"


def test_identity_files_cannot_be_extended_by_an_app_id() -> None:
    text = identity_text("org.flatpak", "evil\n[Context]\nshared=network", " inst\\")
    assert text.splitlines() == [
        "[Application]",
        "name=evil\\n[Context]\\nshared=network",
        "",
        "[Instance]",
        "instance-id=\\sinst\\\\",
    ]
    assert identity_path("org.flatpak") == "/.flatpak-info"
    assert identity_path("io.snapcraft") == "/.xdg-containers-info"
    assert "type=io.snapcraft\n" in identity_text("io.snapcraft", "a", "b")


async def test_link_answers_in_order_discards_late_answers_and_reports_loss() -> None:
    """Answers go to requests in order; one that timed out has its late answer dropped;
    EOF fails what is pending and calls on_lost once."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lost: list[str] = []
    link = AnchorLink(asyncio.get_running_loop(), ours, lost.append)
    first = link.request("unix:abstract=one")
    second = link.request("unix:abstract=two")
    assert theirs.recv(100) == b"unix:abstract=one"
    assert theirs.recv(100) == b"unix:abstract=two"
    theirs.send(b"\x01first failed")
    a, b = _connected_stream()
    theirs.sendmsg([b"\x00"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                a.fileno().to_bytes(4, "little"))])
    with pytest.raises(AnchorError, match="first failed"):
        await asyncio.wait_for(first, 2)
    sock = await asyncio.wait_for(second, 2)
    sock.close()
    # a timed-out request: its late answer must not go to the next one
    third = link.request("unix:abstract=three")
    link._timed_out(third)  # as the 5 s timer would
    with pytest.raises(AnchorError, match="did not answer"):
        await third
    fourth = link.request("unix:abstract=four")
    theirs.send(b"\x01late answer to three")
    theirs.send(b"\x01answer to four")
    with pytest.raises(AnchorError, match="answer to four"):
        await asyncio.wait_for(fourth, 2)
    pending = link.request("unix:abstract=five")
    theirs.close()
    with pytest.raises(AnchorError, match="gone"):
        await asyncio.wait_for(pending, 2)
    assert len(lost) == 1 and link.closed
    a.close()
    b.close()


async def test_pending_requests_pass_to_a_new_anchor() -> None:
    """A launcher registered again: a client waiting on the old anchor is answered by the
    new one, not failed by the swap."""
    import array
    import asyncio

    from xdg_containers.io.anchor_link import AnchorLink

    loop = asyncio.get_running_loop()
    old_ours, old_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    new_ours, new_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old, new = AnchorLink(loop, old_ours), AnchorLink(loop, new_ours)
    old.bus_request = "unix:path=/nowhere"
    waiting = old.connect()
    assert old_theirs.recv(100) == b"unix:path=/nowhere"
    old.pass_pending_to(new)
    old.close()
    assert new_theirs.recv(100) == b"unix:path=/nowhere"
    a, b = _connected_stream()
    new_theirs.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [a.fileno()]))])
    got = await asyncio.wait_for(waiting, 5)
    assert got.type == socket.SOCK_STREAM
    for s in (got, a, b, old_theirs, new_theirs):
        s.close()
    new.close()
