"""The fd keeper's protocol (docs/fdstore.md): packets, names, and the bus's answer.

Stdlib only: the keeper (``fdkeeper``, run by path) imports it beside itself, the
service as ``xdg_containers.service.fdproto``.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

MAX_PACKET = 4096
#: What one SCM_RIGHTS message carries at most (the kernel's SCM_MAX_FD).
MAX_FDS = 253
NAME_MAX = 255
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def valid_name(name: str) -> bool:
    """An fd name of ours: 1-255 of ``[A-Za-z0-9._-]`` (no ':', the FDNAMES separator)."""
    return 0 < len(name) <= NAME_MAX and all(c in NAME_CHARS for c in name)


def parse_fields(data: bytes) -> dict[str, str]:
    """``KEY=value`` lines of one packet (ValueError on anything else)."""
    text = data.decode("ascii")
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        key, eq, value = line.partition("=")
        if not eq or not key.isupper() or key in fields:
            raise ValueError(f"bad line {line[:60]!r}")
        fields[key] = value
    return fields


def recv_packet(sock: socket.socket) -> tuple[bytes, list[int], int]:
    """One packet, its fds (close-on-exec) and recvmsg's flags. Not socket.recv_fds: in
    3.11 it drops its flags argument, so received fds would leak into children."""
    data, anc, flags, _ = sock.recvmsg(MAX_PACKET, socket.CMSG_SPACE(MAX_FDS * 4),
                                       socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
    return data, fds, flags


def log(text: str) -> None:
    """One line on stderr (the service's, or the journal's)."""
    sys.stderr.write(f"xdg-containers fd keeper[{os.getpid()}]: {text}\n")
    sys.stderr.flush()


def reply_outcome(data: bytes, serial: int) -> str | None:
    """What the bus answered to call ``serial``, from the bytes it sent after BEGIN (the
    SASL ``OK`` line first); None while that reply has not arrived."""
    end = data.find(b"\r\n")
    if end < 0:
        return None
    if not data.startswith(b"OK "):
        return f"the bus refused authentication: {data[:end]!r}"
    pos = end + 2
    while len(data) - pos >= 16:
        order = "<" if data[pos : pos + 1] == b"l" else ">"
        kind = data[pos + 1]
        body_len, _serial, fields_len = struct.unpack_from(order + "III", data, pos + 4)
        total = 16 + fields_len + (-fields_len % 8) + body_len
        if len(data) - pos < total:
            return None
        fields = _header_fields(data[pos + 16 : pos + 16 + fields_len], order)
        if kind in (2, 3) and fields.get(5) == serial:
            return "started" if kind == 2 else f"failed: {fields.get(4)}"
        pos += total
    return None


def _header_fields(raw: bytes, order: str) -> dict[int, int | str]:
    """The u and s/o/g header fields by code (offsets count from the fields' start,
    which sits at 16, a multiple of 8)."""
    out: dict[int, int | str] = {}
    i = 0
    while i + 4 <= len(raw):
        i += -i % 8
        code, siglen = raw[i], raw[i + 1]
        sig = raw[i + 2 : i + 2 + siglen]
        i += 3 + siglen
        if sig == b"g":
            n = raw[i]
            out[code] = raw[i + 1 : i + 1 + n].decode("ascii", "replace")
            i += n + 2
            continue
        i += -i % 4
        (value,) = struct.unpack_from(order + "I", raw, i)
        i += 4
        if sig in (b"s", b"o"):
            out[code] = raw[i : i + value].decode("utf-8", "replace")
            i += value + 1
        else:
            out[code] = value
    return out
