"""A narrow D-Bus value codec: skip any value, read strings, write simple bodies.

The proxy decodes only the few bus-driver bodies it must inspect (strings and
string arrays) and builds only the few messages it sends itself, so a general
marshaller is not needed on the forwarding path.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

_FIXED_SIZES = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4}
_MAX_DEPTH = 64
#: The specification caps arrays at 64 MiB.
_MAX_ARRAY = 64 * 1024 * 1024


class SignatureError(ValueError):
    """A signature or the value it describes is malformed."""


def _single_type_end(sig: str, i: int) -> int:
    """Index just past the single complete type starting at sig[i]."""
    depth = 0
    while True:
        if i >= len(sig):
            raise SignatureError("incomplete signature")
        c = sig[i]
        if c == "a":
            i += 1
            continue
        if c == "(":
            depth += 1
            i += 1
            continue
        if c == "{":
            depth += 1
            i += 1
            continue
        if c in ")}":
            depth -= 1
            if depth < 0:
                raise SignatureError("unbalanced signature")
            i += 1
            if depth == 0:
                return i
            continue
        if c not in _FIXED_SIZES and c not in "sogv":
            raise SignatureError(f"unknown type code {c!r}")
        i += 1
        if depth == 0:
            return i


def _alignment(c: str) -> int:
    if c in "({":
        return 8
    if c in "sob":
        return 4
    if c == "a":
        return 4
    if c in "gvy":
        return 1
    return _FIXED_SIZES[c]


def skip_value(
    data: bytes | bytearray | memoryview, pos: int, sig: str, little: bool, end: int, depth: int = 0
) -> int:
    """Return the offset just past the values of ``sig`` starting at ``pos``.

    Used for header fields we do not know: their bytes must be stepped over
    without trusting any declared length beyond ``end``.
    """
    if depth > _MAX_DEPTH:
        raise SignatureError("value nested too deeply")
    u32 = "<I" if little else ">I"
    i = 0
    while i < len(sig):
        c = sig[i]
        if c in _FIXED_SIZES:
            size = _FIXED_SIZES[c]
            pos += -pos % size
            pos += size
            i += 1
        elif c in "so":
            pos += -pos & 3
            if pos + 4 > end:
                raise SignatureError("truncated string")
            (n,) = struct.unpack_from(u32, data, pos)
            pos += 4 + n + 1
            i += 1
        elif c == "g":
            if pos >= end:
                raise SignatureError("truncated signature")
            pos += data[pos] + 2
            i += 1
        elif c == "v":
            if pos >= end:
                raise SignatureError("truncated variant")
            n = data[pos]
            inner = bytes(data[pos + 1 : pos + 1 + n]).decode("ascii", "replace")
            pos += n + 2
            pos = skip_value(data, pos, inner, little, end, depth + 1)
            i += 1
        elif c == "a":
            elem_end = _single_type_end(sig, i + 1)
            elem = sig[i + 1 : elem_end]
            pos += -pos & 3
            if pos + 4 > end:
                raise SignatureError("truncated array")
            (n,) = struct.unpack_from(u32, data, pos)
            if n > _MAX_ARRAY:
                raise SignatureError("array too long")
            pos += 4
            pos += -pos % _alignment(elem[0])
            pos += n
            i = elem_end
        elif c in "({":
            close = _single_type_end(sig, i)
            pos += -pos & 7
            pos = skip_value(data, pos, sig[i + 1 : close - 1], little, end, depth + 1)
            i = close
        else:
            raise SignatureError(f"unknown type code {c!r}")
        if pos > end:
            raise SignatureError("value runs past its container")
    return pos


def read_string(data: bytes | bytearray | memoryview, pos: int, little: bool) -> tuple[str, int]:
    """Read one ``s``/``o`` value at ``pos`` (aligned here); return it and the next offset."""
    pos += -pos & 3
    if pos + 4 > len(data):
        raise SignatureError("truncated string")
    (n,) = struct.unpack_from("<I" if little else ">I", data, pos)
    start = pos + 4
    stop = start + n
    if stop >= len(data) or data[stop] != 0:
        raise SignatureError("truncated string")
    try:
        return bytes(data[start:stop]).decode("utf-8"), stop + 1
    except UnicodeDecodeError as exc:
        raise SignatureError("string is not UTF-8") from exc


def read_uint32(data: bytes | bytearray | memoryview, pos: int, little: bool) -> tuple[int, int]:
    """Read one ``u`` value at ``pos`` (aligned here)."""
    pos += -pos & 3
    if pos + 4 > len(data):
        raise SignatureError("truncated uint32")
    (v,) = struct.unpack_from("<I" if little else ">I", data, pos)
    return int(v), pos + 4


def read_string_array(
    data: bytes | bytearray | memoryview, pos: int, little: bool
) -> tuple[list[str], int]:
    """Read one ``as`` value at ``pos``."""
    pos += -pos & 3
    if pos + 4 > len(data):
        raise SignatureError("truncated array")
    (n,) = struct.unpack_from("<I" if little else ">I", data, pos)
    pos += 4
    stop = pos + n
    if stop > len(data):
        raise SignatureError("truncated array")
    out: list[str] = []
    while pos < stop:
        s, pos = read_string(data, pos, little)
        out.append(s)
    if pos != stop:
        raise SignatureError("array length does not match its elements")
    return out, pos


class BodyWriter:
    """Little-endian marshaller for the simple bodies the proxy builds itself."""

    def __init__(self, start_offset: int = 0) -> None:
        """``start_offset`` is where the body begins in the message (always 8-aligned)."""
        self.buf = bytearray()
        self._base = start_offset

    def _align(self, n: int) -> None:
        self.buf.extend(b"\0" * (-(self._base + len(self.buf)) % n))

    def byte(self, v: int) -> None:
        """Append a ``y``."""
        self.buf.append(v)

    def uint32(self, v: int) -> None:
        """Append a ``u`` (or ``b``)."""
        self._align(4)
        self.buf.extend(struct.pack("<I", v))

    def string(self, s: str) -> None:
        """Append an ``s`` or ``o``."""
        raw = s.encode("utf-8")
        self.uint32(len(raw))
        self.buf.extend(raw)
        self.buf.append(0)

    def signature(self, s: str) -> None:
        """Append a ``g``."""
        raw = s.encode("ascii")
        self.buf.append(len(raw))
        self.buf.extend(raw)
        self.buf.append(0)

    def string_array(self, items: Sequence[str]) -> None:
        """Append an ``as``."""
        self._align(4)
        len_pos = len(self.buf)
        self.buf.extend(b"\0\0\0\0")
        start = len(self.buf)
        for s in items:
            self.string(s)
        struct.pack_into("<I", self.buf, len_pos, len(self.buf) - start)

    def bytes(self) -> bytes:
        """The marshalled body."""
        return bytes(self.buf)
