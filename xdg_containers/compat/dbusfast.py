"""dbus-fast across releases: Debian 12's 1.84.2 up to 5.x, through its public API only.

What differs, and how this module makes it one API:

- the decorators were ``method``/``signal`` until 2.46 and ``dbus_method``/``dbus_signal``
  since (5.x keeps the old names as aliases): the newest name present is used;
- signatures come from annotations; ``Annotated[..., DBusSignature()]`` needs 4.0, signature
  strings work everywhere but are not types for mypy: the decorators here take the
  signatures explicitly and hand dbus-fast string annotations through ``__signature__``;
- a method returning several values must return a list before 5.0 (5.x takes a list or a
  tuple): callers return lists;
- ``MessageBus()`` connects its socket in the constructor before 5.0 and in ``connect()``
  since: ``connect_bus`` does both, so every connection error comes from one call;
- before 2.44.3 the reader asks ``recvmsg`` for room for one fd, so the kernel drops every
  further fd of a message (AddServer with StopOnNotify and Connector): ``connect_bus``
  gives such a bus a socket whose ``recvmsg`` makes room for 16, through the
  constructor-made ``MessageBus._sock`` (``cdef public`` in the compiled build);
- before 2.12 the marshaller writes a string's length in characters, not bytes, so a
  message with non-ASCII text is malformed and the bus disconnects the sender: on such a
  release ``connect_bus`` returns a bus whose ``send`` turns a reply holding non-ASCII
  text into a Failed error saying so, escapes it in error texts, and drops such signals
  (``limitations()`` says what is off; the service logs it at start).

Each decorated member also carries a ``Member`` describing it, which the service's own
introspection and dispatch read instead of dbus-fast's private tables.
"""

from __future__ import annotations

import inspect
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec

import dbus_fast.service as _service
from dbus_fast import BusType, Message, MessageType, SignatureTree, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.constants import PropertyAccess

P = ParamSpec("P")
log = logging.getLogger(__name__)

#: The member attribute set on every decorated method, signal and property.
MEMBER_ATTR = "xdg_containers_dbus_member"

# Renamed in 2.46; the old names still exist in 5.x, but may not forever.
_METHOD: Callable[..., Any] = getattr(_service, "dbus_method", None) or _service.method
_SIGNAL: Callable[..., Any] = getattr(_service, "dbus_signal", None) or _service.signal


@dataclass(frozen=True)
class Member:
    """One D-Bus method, signal or property of an interface, as declared here."""

    kind: str  # "method", "signal" or "property"
    name: str
    #: (name, type) of each method argument; empty for signals and properties
    in_args: tuple[tuple[str, str], ...]
    #: the method's reply signature, the signal's body, the property's type
    out_signature: str
    fn: Callable[..., Any]
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def in_signature(self) -> str:
        """The signature a call of this method must have."""
        return "".join(t for _n, t in self.in_args)


def complete_types(signature: str) -> list[str]:
    """The single complete types of ``signature``, in order (ValueError if it is invalid)."""
    try:
        return [t.signature for t in SignatureTree(signature).types]
    except Exception as exc:  # InvalidSignatureError, whose module moved between releases
        raise ValueError(f"invalid D-Bus signature {signature!r}: {exc}") from exc


def _annotate(fn: Callable[..., Any], in_signature: str, out_signature: str) -> None:
    """Give ``fn`` signature-string annotations (what every release parses) without
    touching the Python type hints mypy checks."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    types = complete_types(in_signature)
    if len(params) - 1 != len(types):
        raise TypeError(
            f"{fn.__qualname__}: {len(params) - 1} parameters for signature {in_signature!r}"
        )
    annotated = [params[0]]
    annotated += [p.replace(annotation=t) for p, t in zip(params[1:], types, strict=True)]
    ret = out_signature or inspect.Signature.empty
    fn.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=annotated, return_annotation=ret
    )


def _member_args(fn: Callable[..., Any], in_signature: str) -> tuple[tuple[str, str], ...]:
    names = list(inspect.signature(fn).parameters)[1:]
    return tuple(zip(names, complete_types(in_signature), strict=True))


def dbus_method(
    in_signature: str = "", out_signature: str = ""
) -> Callable[[Callable[P, Any]], Callable[P, None]]:
    """dbus-fast's method decorator with explicit signatures; several return values go in a list."""

    def decorate(fn: Callable[P, Any]) -> Callable[P, None]:
        _annotate(fn, in_signature, out_signature)
        args = _member_args(fn, in_signature)
        wrapped: Callable[P, None] = _METHOD()(fn)
        member = Member("method", fn.__name__, args, out_signature, fn)
        setattr(wrapped, MEMBER_ATTR, member)
        return wrapped

    return decorate


def dbus_signal(signature: str) -> Callable[[Callable[P, Any]], Callable[P, Any]]:
    """dbus-fast's signal decorator with an explicit signature: calling it emits the signal."""

    def decorate(fn: Callable[P, Any]) -> Callable[P, Any]:
        params = list(inspect.signature(fn).parameters.values())
        fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            params, return_annotation=signature
        )
        wrapped: Callable[P, Any] = _SIGNAL()(fn)
        setattr(wrapped, MEMBER_ATTR, Member("signal", fn.__name__, (), signature, fn))
        return wrapped

    return decorate


def dbus_property(
    signature: str, *, emits_changed: str | None = None
) -> Callable[[Callable[[Any], Any]], Any]:
    """A read-only dbus-fast property of type ``signature``; ``emits_changed`` is its
    org.freedesktop.DBus.Property.EmitsChangedSignal annotation (None: the default, true)."""
    if len(complete_types(signature)) != 1:
        raise ValueError(f"a property has one complete type, not {signature!r}")

    def decorate(fn: Callable[[Any], Any]) -> Any:
        _annotate(fn, "", signature)
        prop = _service.dbus_property(access=PropertyAccess.READ)(fn)
        notes = (
            (("org.freedesktop.DBus.Property.EmitsChangedSignal", emits_changed),)
            if emits_changed is not None
            else ()
        )
        setattr(prop, MEMBER_ATTR, Member("property", fn.__name__, (), signature, fn, notes))
        return prop

    return decorate


def members(cls: type) -> list[Member]:
    """The members declared with this module's decorators on ``cls``, in declaration order."""
    found: list[Member] = []
    for klass in reversed(cls.__mro__):
        for value in vars(klass).values():
            member = getattr(value, MEMBER_ATTR, None)
            if isinstance(member, Member):
                found.append(member)
    return found


def dbus_fast_version() -> tuple[int, ...]:
    """The installed dbus-fast's version, as numbers ((0,) if unknown)."""
    try:
        from importlib.metadata import version

        text = version("dbus-fast")
    except Exception:
        from dbus_fast.__version__ import __version__ as text
    parts = []
    for piece in text.split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or (0,)


#: Releases before this receive one fd per message (their recvmsg ancillary buffer).
MANY_FDS_SINCE = (2, 44, 3)
#: Releases before this marshal non-ASCII strings with a wrong length.
TEXT_OK_SINCE = (2, 12)
#: Room for this many fds per message, as dbus-fast 3.0 and later ask for.
MAX_FDS_PER_MESSAGE = 16


class _RoomForFds:
    """The bus socket, but ``recvmsg`` has room for MAX_FDS_PER_MESSAGE fds."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> Any:
        room = socket.CMSG_LEN(MAX_FDS_PER_MESSAGE * 4)
        return self._sock.recvmsg(bufsize, max(ancbufsize, room), flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def needs_fd_room() -> bool:
    """Whether this dbus-fast receives only one fd per message unless helped."""
    return dbus_fast_version() < MANY_FDS_SINCE


def text_ok() -> bool:
    """Whether this dbus-fast marshals non-ASCII strings correctly."""
    return dbus_fast_version() >= TEXT_OK_SINCE


def limitations() -> list[str]:
    """What this dbus-fast release cannot do, one sentence each (empty: nothing)."""
    if text_ok():
        return []
    version = ".".join(map(str, dbus_fast_version()))
    return [
        f"non-ASCII text in replies and signals is off: dbus-fast {version} writes string "
        "lengths in characters, which malforms the message (fixed in dbus-fast 2.12); such "
        "replies become Failed errors, error texts are escaped, such signals are dropped"
    ]


def _non_ascii(value: Any) -> bool:
    if isinstance(value, str):
        return not value.isascii()
    if isinstance(value, Variant):
        return _non_ascii(value.value)
    if isinstance(value, dict):
        return any(_non_ascii(k) or _non_ascii(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_non_ascii(v) for v in value)
    return False


def ascii_safe(msg: Message) -> Message | None:
    """``msg`` if it holds ASCII text only, else what a release before TEXT_OK_SINCE may
    send instead: an error with its text escaped, a Failed error for a reply, None for
    anything else (dropped)."""
    if not _non_ascii(msg.body):
        return msg
    if msg.message_type == MessageType.ERROR:
        text = str(msg.body[0]) if msg.body else ""
        body = [text.encode("ascii", "backslashreplace").decode("ascii")]
        error_name = msg.error_name
    elif msg.message_type == MessageType.METHOD_RETURN:
        error_name = "org.freedesktop.DBus.Error.Failed"
        body = [
            "the reply holds non-ASCII text, which dbus-fast "
            f"{'.'.join(map(str, dbus_fast_version()))} cannot send (fixed in dbus-fast 2.12)"
        ]
    else:
        log.warning(
            "not sending %s %s: it holds non-ASCII text, which this dbus-fast cannot send",
            msg.message_type.name.lower(), msg.member,
        )
        return None
    return Message(
        message_type=MessageType.ERROR, destination=msg.destination,
        reply_serial=msg.reply_serial, error_name=error_name, signature="s", body=body,
    )


class _AsciiOnlyBus(MessageBus):
    """A bus for releases before TEXT_OK_SINCE: ``send`` passes only what they marshal right."""

    def send(self, msg: Message, *args: Any, **kwargs: Any) -> Any:
        """Send ``msg``, or its ASCII-safe replacement, or nothing (see ascii_safe)."""
        safe = ascii_safe(msg)
        if safe is None:
            return None
        return super().send(safe, *args, **kwargs)


async def connect_bus(
    bus_address: str | None = None,
    bus_type: BusType = BusType.SESSION,
    negotiate_unix_fd: bool = False,
) -> MessageBus:
    """A connected MessageBus; every failure to connect raises from here, whichever release
    (before 5.0 the constructor connects the socket, since then ``connect()`` does)."""
    cls = MessageBus if text_ok() else _AsciiOnlyBus
    bus = cls(bus_address=bus_address, bus_type=bus_type, negotiate_unix_fd=negotiate_unix_fd)
    if negotiate_unix_fd and needs_fd_room():
        sock = getattr(bus, "_sock", None)
        if isinstance(sock, socket.socket):
            bus._sock = _RoomForFds(sock)  # type: ignore[assignment]
        else:
            log.warning(
                "dbus-fast %s: MessageBus._sock is not a socket before connect(); this "
                "connection receives only the first fd of a message (AddServer with "
                "StopOnNotify and Connector fails): use dbus-fast >= 3.0",
                ".".join(map(str, dbus_fast_version())),
            )
    try:
        return await bus.connect()
    except BaseException:
        try:
            bus.disconnect()
        except Exception:
            pass
        sock = getattr(bus, "_sock", None)  # an old constructor's, which disconnect() keeps
        if sock is not None:
            sock.close()
        raise


def redispatch(bus: MessageBus, msg: Message) -> None:
    """Run a received message through the bus's handlers and object dispatch again (a call
    held while ``serve --replace`` took the servers over). dbus-fast has no public API
    for it: ``MessageBus._process_message`` is what its reader calls for each message."""
    process = getattr(bus, "_process_message", None)
    if process is None:
        raise RuntimeError("dbus-fast: MessageBus._process_message is gone; held calls "
                           "cannot be dispatched (update compat/dbusfast.py)")
    process(msg)


def keep_message(msg: Message) -> Message:
    """Make ``msg`` safe to keep past its dispatch (a call held during ``serve --replace``).

    dbus-fast's reader hands a message without fds its own empty fd list and extends
    that same list with the next message's fds (5.x: ``Unmarshaller._unix_fds`` is only
    replaced when non-empty), so a message kept for later would show, and have closed,
    fds of another message. The message gets a list of its own.
    """
    msg.unix_fds = list(msg.unix_fds)
    return msg
