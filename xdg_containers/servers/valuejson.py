"""D-Bus values (as dbus-fast holds them) to JSON and back, checked against a signature.

The registry is written to disk so a restarted service can bring its servers back
(SPEC 13); metadata is an ``a{sv}`` of any shape. What is read back is untrusted:
decoding checks every value against its signature and range, and refuses what a
D-Bus message could not carry (fds cannot be stored at all).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from dbus_fast import Variant

from ..wire.names import is_valid_object_path
from ..wire.types import SignatureError, _single_type_end

__all__ = ["SignatureError", "decode", "encode", "split_signature"]

_RANGES = {
    "y": (0, 2**8 - 1),
    "n": (-(2**15), 2**15 - 1),
    "q": (0, 2**16 - 1),
    "i": (-(2**31), 2**31 - 1),
    "u": (0, 2**32 - 1),
    "x": (-(2**63), 2**63 - 1),
    "t": (0, 2**64 - 1),
}
#: Containers nest at most 32 arrays and 32 structs deep (the D-Bus specification).
_MAX_DEPTH = 64


def split_signature(sig: str) -> list[str]:
    """The single complete types of ``sig``, in order; SignatureError when malformed."""
    if len(sig) > 255:
        raise SignatureError("signature longer than 255 bytes")
    out, i = [], 0
    while i < len(sig):
        end = _single_type_end(sig, i)
        out.append(sig[i:end])
        i = end
    return out


def _single(sig: str) -> str:
    parts = split_signature(sig)
    if len(parts) != 1:
        raise SignatureError(f"{sig!r} is not a single complete type")
    return parts[0]


def encode(sig: str, value: Any, depth: int = 0) -> Any:
    """``value`` of the single type ``sig`` as plain JSON data (lists, strings, numbers)."""
    if depth > _MAX_DEPTH:
        raise SignatureError("value nested too deeply")
    c = sig[0]
    if c == "h":
        raise SignatureError("a file descriptor cannot be stored")
    if c == "d":
        return float(value).hex()
    if c in _RANGES or c in "bsog":
        return value
    if c == "v":
        if not isinstance(value, Variant):
            raise SignatureError("a 'v' value must be a Variant")
        inner = _single(value.signature)
        return [inner, encode(inner, value.value, depth + 1)]
    if c == "(":
        fields = split_signature(sig[1:-1])
        return [encode(t, v, depth + 1) for t, v in zip(fields, value, strict=True)]
    if sig == "ay":
        return base64.b64encode(bytes(value)).decode("ascii")
    if sig.startswith("a{"):
        key_t, val_t = split_signature(sig[2:-1])
        return [
            [encode(key_t, k, depth + 1), encode(val_t, v, depth + 1)] for k, v in value.items()
        ]
    item = sig[1:]
    return [encode(item, v, depth + 1) for v in value]


def decode(sig: str, data: Any, depth: int = 0) -> Any:
    """The dbus-fast value of the single type ``sig`` that :func:`encode` wrote as ``data``.

    Raises SignatureError naming what does not fit, for anything ``encode`` could not
    have written (wrong JSON type, out of range, invalid path or signature, too deep).
    """
    if depth > _MAX_DEPTH:
        raise SignatureError("value nested too deeply")
    c = sig[0]
    if c in _RANGES:
        if type(data) is not int or not _RANGES[c][0] <= data <= _RANGES[c][1]:
            raise SignatureError(f"{data!r} is not a valid {c!r}")
        return data
    if c == "b":
        return _expect(data, bool, c)
    if c == "d":
        try:
            return float.fromhex(_expect(data, str, c))
        except ValueError:
            raise SignatureError(f"{data!r} is not a valid 'd'") from None
    if c == "s":
        text = _expect(data, str, c)
        if "\0" in text:
            raise SignatureError("a string holds a NUL")
        return text
    if c == "o":
        if not is_valid_object_path(_expect(data, str, c)):
            raise SignatureError(f"{data!r} is not a valid object path")
        return data
    if c == "g":
        split_signature(_expect(data, str, c))
        return data
    if c == "v":
        pair = _expect(data, list, c)
        if len(pair) != 2:
            raise SignatureError("a 'v' is stored as [signature, value]")
        inner = _single(_expect(pair[0], str, "g"))
        return Variant(inner, decode(inner, pair[1], depth + 1))
    if c == "(":
        fields = split_signature(sig[1:-1])
        items = _expect(data, list, sig)
        if len(items) != len(fields):
            raise SignatureError(f"a {sig!r} needs {len(fields)} fields, not {len(items)}")
        return [decode(t, v, depth + 1) for t, v in zip(fields, items, strict=True)]
    if c == "h":
        raise SignatureError("a file descriptor cannot be stored")
    if sig == "ay":
        try:
            return base64.b64decode(_expect(data, str, sig), validate=True)
        except binascii.Error:
            raise SignatureError("an 'ay' is not valid base64") from None
    if sig.startswith("a{"):
        key_t, val_t = split_signature(sig[2:-1])
        out = {}
        for pair in _expect(data, list, sig):
            if not isinstance(pair, list) or len(pair) != 2:
                raise SignatureError(f"a {sig!r} entry is stored as [key, value]")
            key = decode(key_t, pair[0], depth + 1)
            if key in out:
                raise SignatureError(f"key {key!r} appears twice")
            out[key] = decode(val_t, pair[1], depth + 1)
        return out
    item = sig[1:]
    return [decode(item, v, depth + 1) for v in _expect(data, list, sig)]


def _expect(data: Any, kind: type, what: str) -> Any:
    # bool is an int in Python: never accept one for the other
    if type(data) is not kind:
        raise SignatureError(f"{type(data).__name__} where {what!r} was expected")
    return data
