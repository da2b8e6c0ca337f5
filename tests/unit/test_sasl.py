"""Tests for the SASL handshake: SaslServer (toward confined clients), SaslClient (toward the bus).

Transcripts follow what real clients send (SPEC §5): libdbus, gdbus (bare AUTH
first), sd-bus/busctl (AUTH EXTERNAL then empty DATA, all pipelined) and zbus
(everything plus the first message in one write).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdg_containers.sasl.client import SaslClient
from xdg_containers.sasl.server import MAX_COMMANDS, MAX_LINE, MAX_REJECTS, SaslError, SaslServer
from xdg_containers.wire.build import bus_call

UID = 1000
UID_HEX = b"31303030"  # "1000" as hex-encoded ASCII
GUID = "0123456789abcdef0123456789abcdef"
OK = b"OK " + GUID.encode() + b"\r\n"
REJECTED = b"REJECTED EXTERNAL\r\n"
HELLO = bus_call(1, "Hello")


def server(uid: int = UID, unix_fd_possible: bool = True) -> SaslServer:
    return SaslServer(uid, GUID, unix_fd_possible=unix_fd_possible)


def run(srv: SaslServer, chunks: list[bytes]) -> tuple[bytes, bytes]:
    """Feed chunks until done; return (all replies, leftover + bytes after done)."""
    replies = b""
    rest = b""
    for chunk in chunks:
        if srv.done:
            rest += chunk
        else:
            replies += srv.feed(chunk)
    return replies, (srv.leftover + rest if srv.done else b"")


# (name, client bytes, expected replies, fd negotiated)
TRANSCRIPTS = [
    (
        "libdbus",
        b"\0AUTH EXTERNAL " + UID_HEX + b"\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n",
        OK + b"AGREE_UNIX_FD\r\n",
        True,
    ),
    (
        "gdbus",
        b"\0AUTH\r\nAUTH EXTERNAL " + UID_HEX + b"\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n",
        REJECTED + OK + b"AGREE_UNIX_FD\r\n",
        True,
    ),
    (
        "sd-bus",
        b"\0AUTH EXTERNAL\r\nDATA\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n",
        b"DATA\r\n" + OK + b"AGREE_UNIX_FD\r\n",
        True,
    ),
    (
        "data-hex",
        b"\0AUTH EXTERNAL\r\nDATA " + UID_HEX + b"\r\nBEGIN \t \r\n",
        b"DATA\r\n" + OK,
        False,
    ),
    (
        "tab-separated",
        b"\0AUTH\tEXTERNAL\t" + UID_HEX + b"\r\nBEGIN\t\r\n",
        OK,
        False,
    ),
]


def authenticated_server() -> SaslServer:
    """A server that has answered our AUTH EXTERNAL with OK (BEGIN not sent yet)."""
    srv = server()
    assert srv.feed(b"\0AUTH EXTERNAL " + UID_HEX + b"\r\n") == OK
    return srv


@pytest.mark.parametrize(
    ("client", "expected", "fds"), [t[1:] for t in TRANSCRIPTS], ids=[t[0] for t in TRANSCRIPTS]
)
def test_pipelined_transcript_in_one_feed(client: bytes, expected: bytes, fds: bool) -> None:
    srv = server()
    assert srv.feed(client + HELLO + HELLO) == expected
    assert srv.done
    assert srv.leftover == HELLO + HELLO
    assert srv.authenticated_uid == UID
    assert srv.negotiated_unix_fd is fds


@pytest.mark.parametrize(
    ("client", "expected", "fds"), [t[1:] for t in TRANSCRIPTS], ids=[t[0] for t in TRANSCRIPTS]
)
def test_transcript_one_byte_at_a_time(client: bytes, expected: bytes, fds: bool) -> None:
    srv = server()
    stream = client + HELLO
    replies, rest = run(srv, [stream[i : i + 1] for i in range(len(stream))])
    assert replies == expected
    assert rest == HELLO
    assert srv.negotiated_unix_fd is fds


@settings(max_examples=100, deadline=None)
@given(which=st.integers(0, len(TRANSCRIPTS) - 1), cuts=st.lists(st.integers(0, 400), max_size=10))
def test_any_split_gives_the_same_result(which: int, cuts: list[int]) -> None:
    _, client, expected, fds = TRANSCRIPTS[which]
    stream = client + HELLO + b"\0\r\nBEGIN\r\n"
    points = [0, *sorted(min(c, len(stream)) for c in cuts), len(stream)]
    srv = server()
    replies, rest = run(srv, [stream[a:b] for a, b in itertools.pairwise(points)])
    assert replies == expected
    assert rest == HELLO + b"\0\r\nBEGIN\r\n"
    assert srv.authenticated_uid == UID
    assert srv.negotiated_unix_fd is fds


def test_nothing_yet() -> None:
    srv = server()
    assert srv.feed(b"") == b""
    assert srv.feed(b"\0") == b""
    assert srv.feed(b"AUTH EXTERN") == b""
    assert not srv.done
    assert srv.feed(b"AL " + UID_HEX + b"\r") == b""
    assert srv.feed(b"\n") == OK


def test_empty_data_takes_uid_from_socket() -> None:
    """busctl sends an empty DATA: the uid SO_PEERCRED reported is the one used."""
    a, b = socket.socketpair()
    with a, b:
        creds = a.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, peer_uid, _gid = struct.unpack("3i", creds)
    assert peer_uid == os.getuid()
    srv = SaslServer(peer_uid, GUID)
    assert srv.feed(b"\0AUTH EXTERNAL\r\n") == b"DATA\r\n"
    assert srv.feed(b"DATA\r\n") == OK
    assert srv.authenticated_uid == peer_uid
    assert srv.feed(b"BEGIN\r\n") == b""
    assert srv.done


def test_uid_zero_inline() -> None:
    srv = server(uid=0)
    assert srv.feed(b"\0AUTH EXTERNAL 30\r\n") == OK
    assert srv.authenticated_uid == 0


@pytest.mark.parametrize(
    "lines",
    [
        b"AUTH EXTERNAL 31303031\r\n",  # uid 1001
        b"AUTH EXTERNAL 30\r\n",  # root
        b"AUTH EXTERNAL\r\nDATA 31303031\r\n",
        b"AUTH EXTERNAL zz\r\n",  # not hex
        b"AUTH EXTERNAL 2d31\r\n",  # "-1"
        b"AUTH EXTERNAL 3130303030303030303030\r\n",  # 11 digits
        b"AUTH EXTERNAL\r\nDATA 6162\r\n",  # "ab"
    ],
)
def test_wrong_or_bad_uid_is_rejected(lines: bytes) -> None:
    srv = server()
    replies = srv.feed(b"\0" + lines)
    assert replies.endswith(REJECTED)
    assert OK not in replies
    assert srv.authenticated_uid is None
    assert srv.feed(b"BEGIN\r\n").startswith(b"ERROR")
    assert not srv.done
    # A correct attempt afterwards still succeeds.
    assert srv.feed(b"AUTH EXTERNAL " + UID_HEX + b"\r\n") == OK


@pytest.mark.parametrize(
    "line",
    [b"AUTH", b"AUTH ANONYMOUS", b"AUTH DBUS_COOKIE_SHA1 31303030", b"AUTH external 31303030"],
)
def test_other_mechanisms_rejected(line: bytes) -> None:
    srv = server()
    assert srv.feed(b"\0" + line + b"\r\n") == REJECTED
    assert not srv.done


def test_negotiate_unix_fd_refused_when_not_possible() -> None:
    srv = server(unix_fd_possible=False)
    replies = srv.feed(b"\0AUTH EXTERNAL " + UID_HEX + b"\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n")
    assert replies.startswith(OK + b"ERROR")
    assert replies.endswith(b"\r\n")
    assert replies.count(b"\r\n") == 2
    assert srv.done
    assert srv.negotiated_unix_fd is False


def test_negotiate_before_auth_is_an_error() -> None:
    srv = server()
    assert srv.feed(b"\0NEGOTIATE_UNIX_FD\r\n").startswith(b"ERROR")
    assert srv.negotiated_unix_fd is False


@pytest.mark.parametrize("suffix", [b" ", b"\t", b" \t ", b"\t\t"])
def test_begin_with_trailing_blanks(suffix: bytes) -> None:
    srv = authenticated_server()
    assert srv.feed(b"BEGIN" + suffix + b"\r\n" + HELLO) == b""
    assert srv.done
    assert srv.leftover == HELLO


def test_begin_with_an_argument_is_not_begin() -> None:
    srv = authenticated_server()
    assert srv.feed(b"BEGIN now\r\n").startswith(b"ERROR")
    assert not srv.done


def test_leftover_is_exact() -> None:
    tail = b"\r\nBEGIN\r\n\0\xff" + HELLO + b"AUTH\r\n" * 3
    srv = server()
    assert srv.feed(b"\0AUTH EXTERNAL " + UID_HEX + b"\r\nBEGIN\r\n" + tail) == OK
    assert srv.leftover == tail


def test_no_leftover() -> None:
    srv = server()
    srv.feed(b"\0AUTH EXTERNAL " + UID_HEX + b"\r\nBEGIN\r\n")
    assert srv.done
    assert srv.leftover == b""


def test_feed_after_done_is_an_error() -> None:
    srv = server()
    srv.feed(b"\0AUTH EXTERNAL " + UID_HEX + b"\r\nBEGIN\r\n")
    with pytest.raises(SaslError, match="already finished"):
        srv.feed(HELLO)


@pytest.mark.parametrize("data", [b"AUTH EXTERNAL\r\n", b"X\0AUTH\r\n", b" \0", b"\r\n"])
def test_bytes_before_nul(data: bytes) -> None:
    with pytest.raises(SaslError, match="NUL"):
        server().feed(data)


def test_line_over_16k_with_crlf() -> None:
    srv = server()
    srv.feed(b"\0")
    with pytest.raises(SaslError, match="longer than"):
        srv.feed(b"AUTH EXTERNAL " + b"3" * MAX_LINE + b"\r\n")


def test_line_over_16k_without_crlf() -> None:
    srv = server()
    srv.feed(b"\0" + b"A" * MAX_LINE)  # not over yet: the line may still end here
    with pytest.raises(SaslError, match="longer than"):
        srv.feed(b"A")


def test_line_limit_boundary() -> None:
    fits = b"X" * (MAX_LINE - 2) + b"\r\n"
    srv = server()
    assert srv.feed(b"\0" + fits).startswith(b"ERROR")
    too_long = b"X" * (MAX_LINE - 1) + b"\r\n"
    with pytest.raises(SaslError):
        server().feed(b"\0" + too_long)


def test_line_over_16k_one_byte_at_a_time() -> None:
    srv = server()
    srv.feed(b"\0")
    with pytest.raises(SaslError, match="longer than"):
        for _ in range(MAX_LINE + 10):
            srv.feed(b"3")


@pytest.mark.parametrize(
    "line",
    [
        b"AUTH EXTERNAL \xc3\xa9",
        b"AUTH\x01EXTERNAL",
        b"AUTH\x7f",
        b"AUTH\nEXTERNAL",
        b"AUTH\rEXTERNAL",
        b"AUTH\0",
        b"\x80",
    ],
)
def test_non_ascii_or_control_bytes(line: bytes) -> None:
    with pytest.raises(SaslError, match="non-ASCII or control"):
        server().feed(b"\0" + line + b"\r\n")


@pytest.mark.parametrize("line", [b"auth EXTERNAL 31303030", b"Auth", b"FOO", b"", b" AUTH"])
def test_unknown_commands_get_error(line: bytes) -> None:
    srv = server()
    assert srv.feed(b"\0" + line + b"\r\n").startswith(b"ERROR")
    assert not srv.done
    assert srv.authenticated_uid is None


def test_lowercase_begin_is_not_begin() -> None:
    srv = authenticated_server()
    assert srv.feed(b"begin\r\n").startswith(b"ERROR")
    assert not srv.done


def test_begin_before_ok() -> None:
    srv = server()
    assert srv.feed(b"\0BEGIN\r\n").startswith(b"ERROR")
    assert not srv.done
    assert srv.feed(b"AUTH EXTERNAL\r\n") == b"DATA\r\n"
    assert srv.feed(b"BEGIN\r\n").startswith(b"ERROR")
    assert not srv.done


def test_too_many_commands() -> None:
    srv = server()
    srv.feed(b"\0")
    replies = srv.feed(b"FOO\r\n" * MAX_COMMANDS)
    assert replies.count(b"ERROR") == MAX_COMMANDS
    with pytest.raises(SaslError, match="commands"):
        srv.feed(b"FOO\r\n")


def test_too_many_commands_in_one_feed() -> None:
    with pytest.raises(SaslError, match="commands"):
        server().feed(b"\0" + b"NEGOTIATE_UNIX_FD\r\n" * (MAX_COMMANDS + 1))


def test_too_many_rejects() -> None:
    srv = server()
    assert srv.feed(b"\0" + b"AUTH\r\n" * MAX_REJECTS) == REJECTED * MAX_REJECTS
    with pytest.raises(SaslError, match="rejected"):
        srv.feed(b"AUTH\r\n")


@pytest.mark.parametrize(
    "before",
    [
        b"AUTH EXTERNAL\r\n",  # waiting for DATA
        b"AUTH EXTERNAL " + UID_HEX + b"\r\n",  # waiting for BEGIN
        b"",  # waiting for AUTH
    ],
)
def test_cancel_rejects(before: bytes) -> None:
    srv = server()
    srv.feed(b"\0" + before)
    assert srv.feed(b"CANCEL\r\n") == REJECTED
    assert srv.feed(b"BEGIN\r\n").startswith(b"ERROR")
    assert not srv.done


def test_auth_again_after_ok_starts_over() -> None:
    srv = authenticated_server()
    assert srv.feed(b"AUTH EXTERNAL 31303031\r\n") == REJECTED
    assert srv.feed(b"BEGIN\r\n").startswith(b"ERROR")
    assert not srv.done


def test_data_without_auth_is_an_error() -> None:
    srv = server()
    assert srv.feed(b"\0DATA " + UID_HEX + b"\r\n").startswith(b"ERROR")
    assert srv.authenticated_uid is None


def test_other_command_while_waiting_for_data() -> None:
    srv = server()
    srv.feed(b"\0AUTH EXTERNAL\r\n")
    assert srv.feed(b"BEGIN\r\n").startswith(b"ERROR")
    assert srv.feed(b"AUTH EXTERNAL\r\n") == REJECTED


# -- client side (toward the bus) ---------------------------------------------------------


def test_client_start() -> None:
    assert SaslClient(1000).start() == b"\0AUTH EXTERNAL 31303030\r\n"
    assert SaslClient(0).start() == b"\0AUTH EXTERNAL 30\r\n"


def test_client_ok_then_agree() -> None:
    cl = SaslClient(UID)
    cl.feed(OK)
    assert cl.bus_guid == GUID
    assert not cl.done  # BEGIN not sent yet
    assert cl.begin(True) == b"NEGOTIATE_UNIX_FD\r\nBEGIN\r\n"
    assert not cl.done  # AGREE_UNIX_FD not received yet
    cl.feed(b"AGREE_UNIX_FD\r\n" + HELLO)
    assert cl.done
    assert cl.unix_fd_agreed is True
    assert cl.leftover == HELLO


def test_client_without_fds() -> None:
    cl = SaslClient(UID)
    assert cl.begin(False) == b"BEGIN\r\n"
    assert not cl.done
    cl.feed(OK + HELLO)
    assert cl.done
    assert cl.unix_fd_agreed is False
    assert cl.leftover == HELLO


def test_client_may_send_messages_right_after_begin_before_the_ok() -> None:
    # Pipelined like sd-bus: BEGIN and fd-less messages follow AUTH at once; the bus
    # reads its lines in order. Fds still wait for the whole answer (done).
    cl = SaslClient(UID)
    cl.start()
    assert not cl.may_send_messages  # no BEGIN yet
    cl.begin(True)
    assert cl.may_send_messages
    assert not cl.done
    cl.feed(OK)
    assert cl.may_send_messages and not cl.done  # AGREE_UNIX_FD still to come
    cl.feed(b"AGREE_UNIX_FD\r\n" + HELLO)
    assert cl.done and cl.unix_fd_agreed and cl.leftover == HELLO


def test_client_pipelined_then_refused_raises() -> None:
    # BEGIN went before the answer; a refusal must still end the handshake.
    cl = SaslClient(UID)
    cl.begin(False)
    with pytest.raises(SaslError, match="refused"):
        cl.feed(REJECTED)
    assert not cl.done


def test_client_pipelined_one_byte_at_a_time() -> None:
    cl = SaslClient(UID)
    cl.begin(True)
    answer = OK + b"AGREE_UNIX_FD\r\n"
    for i in range(len(answer)):
        assert not cl.done
        cl.feed(answer[i : i + 1])
    assert cl.done
    assert cl.unix_fd_agreed
    assert cl.leftover == b""


def test_client_fd_refused_by_bus() -> None:
    cl = SaslClient(UID)
    cl.begin(True)
    cl.feed(OK + b'ERROR "no fds"\r\n' + HELLO)
    assert cl.done
    assert cl.unix_fd_agreed is False
    assert cl.leftover == HELLO


@pytest.mark.parametrize(
    "answer",
    [REJECTED, b"REJECTED EXTERNAL DBUS_COOKIE_SHA1\r\n", b"ERROR\r\n", b"OK\r\n", b"DATA\r\n"],
)
def test_client_refused(answer: bytes) -> None:
    cl = SaslClient(UID)
    with pytest.raises(SaslError, match="refused"):
        cl.feed(answer)
    assert not cl.done


def test_client_unexpected_data_before_begin() -> None:
    cl = SaslClient(UID)
    with pytest.raises(SaslError, match="unexpected"):
        cl.feed(OK + b"AGREE_UNIX_FD\r\n")


def test_client_unexpected_answer_to_negotiate() -> None:
    cl = SaslClient(UID)
    cl.begin(True)
    with pytest.raises(SaslError, match="NEGOTIATE_UNIX_FD"):
        cl.feed(OK + b"DATA\r\n")


def test_client_overlong_line() -> None:
    cl = SaslClient(UID)
    with pytest.raises(SaslError, match="overlong"):
        cl.feed(b"O" * (MAX_LINE + 1))


def test_client_and_server_talk() -> None:
    srv = server()
    cl = SaslClient(UID)
    replies = srv.feed(cl.start() + cl.begin(True) + HELLO)
    assert srv.done
    assert srv.leftover == HELLO
    cl.feed(replies)
    assert cl.done
    assert cl.unix_fd_agreed
    assert cl.bus_guid == GUID
