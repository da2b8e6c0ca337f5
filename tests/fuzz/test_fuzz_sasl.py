"""Property tests for the server side of SASL (xdg_containers/sasl/server.py).

Random line sequences (real commands, near misses, lowercase, blanks, binary, overlong
lines, other uids), with or without the leading NUL, fed in random pieces:

- nothing but SaslError ever escapes ``feed``;
- ``done`` is never reached without the NUL first, an ``OK`` answering a valid EXTERNAL
  authentication for the peer's own uid, and a BEGIN after it with nothing resetting the
  authentication in between;
- the outcome does not depend on how the bytes were split;
- after ``done``, ``leftover`` is exactly what followed the BEGIN line;
- every answer is one of the protocol's lines, at most one per command.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz_settings
from xdg_containers.sasl.server import MAX_LINE, SaslError, SaslServer

FUZZ = fuzz_settings(200)

PEER_UID = 1000
OTHER_UID = 0
GUID = "0123456789abcdef0123456789abcdef"


def _hex(uid: int | str) -> str:
    return str(uid).encode().hex()


_VOCAB = [
    f"AUTH EXTERNAL {_hex(PEER_UID)}",
    f"AUTH EXTERNAL {_hex(OTHER_UID)}",
    f"AUTH EXTERNAL {_hex(PEER_UID).upper()}",
    f"AUTH\tEXTERNAL\t{_hex(PEER_UID)}",
    f"AUTH  EXTERNAL  {_hex(PEER_UID)} ",
    "AUTH EXTERNAL",
    "AUTH EXTERNAL ",
    "AUTH",
    "AUTH DBUS_COOKIE_SHA1 31303030",
    "AUTH ANONYMOUS",
    f"AUTH EXTERNAL {_hex('1000x')}",
    "AUTH EXTERNAL zz",
    f"auth external {_hex(PEER_UID)}",
    "DATA",
    "DATA ",
    f"DATA {_hex(PEER_UID)}",
    f"DATA {_hex(OTHER_UID)}",
    "DATA 3",
    "data",
    "BEGIN",
    "BEGIN ",
    "BEGIN\t",
    "BEGIN \t ",
    "BEGIN x",
    "begin",
    " BEGIN",
    "NEGOTIATE_UNIX_FD",
    "NEGOTIATE_UNIX_FD x",
    "negotiate_unix_fd",
    "CANCEL",
    "ERROR",
    'ERROR "whatever"',
    "OK 1234",
    "REJECTED EXTERNAL",
    "AGREE_UNIX_FD",
    "",
    " ",
    "\t",
]

_printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
_line = st.one_of(
    st.sampled_from(_VOCAB).map(str.encode),
    st.sampled_from(_VOCAB).map(str.encode),
    st.sampled_from(_VOCAB).map(str.encode),
    _printable.map(str.encode),
    st.binary(max_size=20),
    st.builds(lambda n: b"A" * n, st.integers(MAX_LINE - 4, MAX_LINE + 4)),
    st.sampled_from(["\u00e9", "\x7f", "\x1b[31m", "\x00"]).map(lambda s: s.encode()),
)


@st.composite
def streams(draw: Any) -> bytes:
    """Mostly plausible handshakes (vocabulary lines, CRLF), sometimes noise."""
    noisy = draw(st.integers(0, 2)) == 0
    lines = draw(st.lists(_line if noisy else st.sampled_from(_VOCAB).map(str.encode), max_size=14))
    if noisy:
        sep = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
        body = b"".join(line + (sep if draw(st.integers(0, 3)) == 0 else b"\r\n") for line in lines)
        lead = draw(st.sampled_from([b"\0", b"\0", b"", b"\0\0", b"x\0"]))
    else:
        body = b"".join(line + b"\r\n" for line in lines)
        lead = b"\0"
    tail = draw(st.sampled_from([b"", b"l\x01\x00\x01\x00\x00\x00\x00", b"\0\0", b"more"]))
    return lead + body + tail


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def run(chunks: list[bytes]) -> tuple[str, bytes, bool, bytes, int | None]:
    """Feed like the session does: stop feeding once done; later bytes are messages.

    Returns (error or "", output, negotiated_unix_fd, leftover, authenticated uid).
    """
    s = SaslServer(PEER_UID, GUID, unix_fd_possible=True)
    out = b""
    rest = b""
    try:
        for chunk in chunks:
            if s.done:
                rest += chunk
                continue
            out += s.feed(chunk)
    except SaslError:
        return ("error", out, s.negotiated_unix_fd, b"", s.authenticated_uid)
    if not s.done:
        return ("", out, s.negotiated_unix_fd, b"", s.authenticated_uid)
    return ("done", out, s.negotiated_unix_fd, s.leftover + rest, s.authenticated_uid)


_ANSWER = re.compile(
    rb"(OK " + GUID.encode() + rb"|REJECTED EXTERNAL|DATA|AGREE_UNIX_FD|ERROR \"[ -~]*\")\r\n"
)


@FUZZ
@given(data=st.data(), stream=streams())
def test_only_sasl_error_and_split_invariance(data: Any, stream: bytes) -> None:
    whole = run([stream])
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    pieces = run(_chunks(stream, cuts))
    one_by_one = (
        run([stream[i : i + 1] for i in range(len(stream))]) if len(stream) < 400 else pieces
    )
    if whole[0] == "error":
        # Output before the error may differ (it is lost with the exception); the verdict
        # may not.
        assert pieces[0] == "error" and one_by_one[0] == "error"
    else:
        assert pieces == whole
        assert one_by_one == whole


@FUZZ
@given(stream=streams())
def test_answers_are_protocol_lines(stream: bytes) -> None:
    _status, out, _fd, _left, _uid = run([stream])
    pos = 0
    while pos < len(out):
        m = _ANSWER.match(out, pos)
        assert m is not None, f"unexpected answer {out[pos : pos + 60]!r}"
        pos = m.end()
    commands = stream.count(b"\r\n")
    assert out.count(b"\r\n") <= commands


def _lines_until_done(stream: bytes) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
    """Feed line by line; return [(line, answer)] up to the line that finished, and what
    followed; None if the handshake did not finish."""
    s = SaslServer(PEER_UID, GUID)
    if not stream.startswith(b"\0"):
        return None
    pos = 1
    transcript: list[tuple[bytes, bytes]] = []
    try:
        s.feed(b"\0")
        while not s.done:
            end = stream.find(b"\r\n", pos)
            if end < 0:
                return None
            line = stream[pos : end + 2]
            transcript.append((line[:-2], s.feed(line)))
            pos = end + 2
    except SaslError:
        return None
    return transcript, stream[pos:]


def _valid_auth(line: bytes, previous: list[tuple[bytes, bytes]]) -> bool:
    """True if ``line`` is an EXTERNAL authentication for PEER_UID (inline or via DATA)."""
    words = line.replace(b"\t", b" ").split()
    uid_hex = _hex(PEER_UID).encode()
    if words[:2] == [b"AUTH", b"EXTERNAL"]:
        return len(words) == 3 and words[2].lower() == uid_hex
    if words[:1] == [b"DATA"] and (len(words) == 1 or words[1].lower() == uid_hex):
        # DATA continues an "AUTH EXTERNAL" without initial response answered with DATA.
        # ERROR answers (unknown commands) leave the state as it was (D-Bus spec,
        # WaitingForData: "anything else: send ERROR").
        for prev, answer in reversed(previous):
            if answer == b"DATA\r\n":
                return prev.replace(b"\t", b" ").split() == [b"AUTH", b"EXTERNAL"]
            if answer and not answer.startswith(b"ERROR"):
                return False
    return False


@FUZZ
@given(stream=streams())
def test_done_only_after_a_valid_auth_then_begin(stream: bytes) -> None:
    status, _out, _fd, leftover, uid = run([stream])
    event(f"outcome: {status or 'unfinished'}")
    if status != "done":
        return
    assert stream.startswith(b"\0"), "done without the leading NUL"
    assert uid == PEER_UID
    traced = _lines_until_done(stream)
    assert traced is not None, "line-by-line feeding did not finish where whole feeding did"
    transcript, after = traced
    assert leftover == after, "leftover is not exactly what followed BEGIN"
    last_line, last_answer = transcript[-1]
    assert last_line.rstrip(b" \t") == b"BEGIN" and last_answer == b""
    # The last answer that was OK or REJECTED or DATA must be OK, for a valid auth line.
    for i in range(len(transcript) - 2, -1, -1):
        line, answer = transcript[i]
        if answer.startswith((b"OK ", b"REJECTED", b"DATA")):
            assert answer.startswith(b"OK "), f"BEGIN accepted after {answer!r}"
            assert _valid_auth(line, transcript[:i]), f"OK given for {line!r}"
            break
        words = line.replace(b"\t", b" ").split()
        assert words[:1] not in ([b"AUTH"], [b"CANCEL"], [b"ERROR"]), (
            f"{line!r} between OK and BEGIN did not reset the authentication"
        )
    else:
        raise AssertionError("BEGIN accepted without any OK")


@FUZZ
@given(uid=st.integers(0, 2**32), inline=st.booleans(), stream_tail=st.binary(max_size=40))
def test_only_the_peer_uid_is_accepted(uid: int, inline: bool, stream_tail: bytes) -> None:
    if inline:
        stream = b"\0AUTH EXTERNAL " + _hex(uid).encode() + b"\r\nBEGIN\r\n" + stream_tail
    else:
        stream = b"\0AUTH EXTERNAL\r\nDATA " + _hex(uid).encode() + b"\r\nBEGIN\r\n" + stream_tail
    status, out, _fd, leftover, got = run([stream])
    if uid == PEER_UID:
        assert status == "done" and got == PEER_UID and leftover == stream_tail
    else:
        assert status != "done"
        assert b"OK" not in out
