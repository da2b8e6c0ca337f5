"""Admin views: ``list``, ``info PATH``, ``identify BUS_NAME``, ``stop PATH``.

Each asks a running service (never starting one: every call carries
NO_AUTO_START) and prints a table for people or JSON (``--json``) for scripts.
Exit codes: 0 ok, 1 the service refused (no such server, not a container...),
2 usage, 3 the service is not running on that bus, 4 no bus to talk to.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_fast.aio import MessageBus

from .client import (
    EXIT_ERROR,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    NOT_RUNNING,
    CallError,
    ClientError,
    bytestring,
    call,
    choose_address,
    connect,
    get_all,
    pidfd_pid,
    plain,
    server_path,
    show,
)

#: Properties of org.freedesktop.DBus.Containers1.Server, in display order.
PROPERTY_ORDER = (
    "ContainerType",
    "AppID",
    "InstanceID",
    "Address",
    "SocketPath",
    "Listening",
    "Connections",
    "MessagesForwarded",
    "MessagesDenied",
    "Creator",
    "Metadata",
)
_BYTESTRINGS = ("SocketPath", "LinuxSecurityLabel")
#: After "not running": the admin views never start the service (NO_AUTO_START).
NOT_RUNNING_HINT = (
    " (these views never start it; 'xdg-containers serve' or the first launch with "
    "'xdg-containers run' does), or it runs on another bus: see --address and --system"
)
#: After "no such server".
NO_SUCH_SERVER_HINT = "'xdg-containers list' shows the live ones"


def add_admin_parsers(sub: Any) -> None:
    """Register list/info/identify/stop."""
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--session", action="store_true", help="ask on the session bus (default)")
    where.add_argument("--system", action="store_true", help="ask on the system bus")
    where.add_argument("--address", metavar="ADDR", help="ask on the bus at this D-Bus address")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("list", parents=[common], help="list every server of the running service")
    p.set_defaults(handler=lambda a: _run(a, _list))

    p = sub.add_parser("info", parents=[common], help="show one server in full")
    p.add_argument("path", metavar="PATH", help="server object path (or cN for .../Containers1/cN)")
    p.set_defaults(handler=lambda a: _run(a, _info))

    p = sub.add_parser(
        "identify", parents=[common], help="which app instance a bus connection belongs to"
    )
    p.add_argument("bus_name", metavar="BUS_NAME", help="unique (:1.42) or well-known name")
    p.set_defaults(handler=lambda a: _run(a, _identify))

    p = sub.add_parser("stop", parents=[common], help="stop a server")
    p.add_argument("path", metavar="PATH", help="server object path (or cN)")
    p.add_argument(
        "--listening-only",
        action="store_true",
        help="only stop accepting connections; existing ones keep working (StopListening)",
    )
    p.set_defaults(handler=lambda a: _run(a, _stop))


Command = Callable[[MessageBus, argparse.Namespace], Awaitable[int]]


def _run(args: argparse.Namespace, command: Command) -> int:
    """Connect to the chosen bus, run ``command``, turn failures into messages and codes."""
    try:
        if getattr(args, "path", None) is not None:
            args.path = server_path(args.path)
        return asyncio.run(_connected(args, command))
    except ClientError as exc:
        print(f"xdg-containers: {exc}", file=sys.stderr)
        return exc.exit_code


async def _connected(args: argparse.Namespace, command: Command) -> int:
    """Run ``command`` on a fresh connection; map D-Bus errors to ClientError."""
    address = choose_address(args.session, args.system, args.address)
    bus = await connect(address)
    try:
        return await command(bus, args)
    except CallError as exc:
        if exc.service_missing():
            raise ClientError(NOT_RUNNING + NOT_RUNNING_HINT, EXIT_NOT_RUNNING) from exc
        raise ClientError(f"{exc.short_name}: {exc.text}", EXIT_ERROR) from exc
    finally:
        bus.disconnect()


def _emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON."""
    print(json.dumps(data, indent=2, sort_keys=False))


def _json_props(path: str, props: dict[str, Any]) -> dict[str, Any]:
    """A server's properties as JSON-ready data, ``Path`` first."""
    out: dict[str, Any] = {"Path": path}
    for key in PROPERTY_ORDER:
        if key in props:
            value = props[key]
            out[key] = bytestring(value) if key in _BYTESTRINGS else plain(value)
    for key, value in props.items():
        if key not in out:
            out[key] = plain(value)
    if "Creator" in out:
        out["Creator"] = _json_creds(props["Creator"])
    return out


def _json_creds(creds: dict[str, Any]) -> dict[str, Any]:
    """A credentials a{sv} as JSON-ready data (labels as text)."""
    out: dict[str, Any] = {}
    for key, var in creds.items():
        value = getattr(var, "value", var)
        out[key] = bytestring(value) if key in _BYTESTRINGS else plain(value)
    return out


def _table(rows: list[list[str]]) -> str:
    """Rows as left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _yes(value: Any) -> str:
    """yes or no."""
    return "yes" if value else "no"


def _creds_text(creds: dict[str, Any]) -> str:
    """Credentials on one line: uid, pid, groups, label."""
    parts: list[str] = []
    values = {k: getattr(v, "value", v) for k, v in creds.items()}
    if "UnixUserID" in values:
        parts.append(f"uid {values['UnixUserID']}")
    if "ProcessID" in values:
        parts.append(f"pid {values['ProcessID']}")
    if "UnixGroupIDs" in values:
        parts.append("groups " + ",".join(str(g) for g in values["UnixGroupIDs"]))
    if "LinuxSecurityLabel" in values:
        parts.append("label " + bytestring(values["LinuxSecurityLabel"]))
    for key, value in values.items():
        if key not in ("UnixUserID", "ProcessID", "UnixGroupIDs", "LinuxSecurityLabel"):
            parts.append(f"{key} {show(value)}")
    return ", ".join(parts) or "-"


def _metadata_lines(metadata: dict[str, Any], indent: str = "  ") -> list[str]:
    """One ``key = value`` line per metadata entry."""
    if not metadata:
        return [f"{indent}(none)"]
    return [f"{indent}{key} = {show(value)}" for key, value in sorted(metadata.items())]


def _field_lines(fields: list[tuple[str, str]]) -> list[str]:
    """``Label: value`` lines with the values aligned."""
    width = max(len(label) for label, _ in fields) + 1
    return [f"{(label + ':').ljust(width)} {value}".rstrip() for label, value in fields]


# -- list ---------------------------------------------------------------------------------


async def _list(bus: MessageBus, args: argparse.Namespace) -> int:
    """ListServers, then every server's properties (a server gone meanwhile is skipped)."""
    reply = await call(bus, "ListServers")
    servers: list[tuple[str, dict[str, Any]]] = []
    for path in reply.body[0]:
        try:
            servers.append((path, await get_all(bus, path)))
        except CallError as exc:
            if exc.service_missing():
                raise
            continue  # removed between ListServers and GetAll
    if args.json:
        _emit_json([_json_props(path, props) for path, props in servers])
        return EXIT_OK
    if not servers:
        print("no servers")
        return EXIT_OK
    rows = [["PATH", "TYPE", "APP-ID", "INSTANCE", "LISTENING", "CONNS", "FORWARDED", "DENIED"]]
    for path, props in servers:
        rows.append(
            [
                path,
                str(props.get("ContainerType", "")),
                str(props.get("AppID", "")) or "-",
                str(props.get("InstanceID", "")) or "-",
                _yes(props.get("Listening")),
                str(len(props.get("Connections", []))),
                str(props.get("MessagesForwarded", 0)),
                str(props.get("MessagesDenied", 0)),
            ]
        )
    print(_table(rows))
    return EXIT_OK


# -- info ---------------------------------------------------------------------------------


async def _info(bus: MessageBus, args: argparse.Namespace) -> int:
    """GetServerInfo (for its NotContainer) and every property of the server object."""
    path: str = args.path
    try:
        await call(bus, "GetServerInfo", "o", [path])
        props = await get_all(bus, path)
    except CallError as exc:
        if exc.short_name in ("NotContainer", "UnknownObject", "UnknownMethod"):
            message = f"no such server: {path} ({NO_SUCH_SERVER_HINT})"
            raise ClientError(message, EXIT_ERROR) from exc
        raise
    if args.json:
        _emit_json(_json_props(path, props))
        return EXIT_OK
    conns = list(props.get("Connections", []))
    fields = [
        ("Path", path),
        ("Container type", str(props.get("ContainerType", ""))),
        ("App ID", str(props.get("AppID", "")) or "-"),
        ("Instance ID", str(props.get("InstanceID", "")) or "-"),
        ("Address", str(props.get("Address", "")) or "- (launcher-provided socket)"),
        ("Socket path", bytestring(props.get("SocketPath", b"")) or "-"),
        ("Listening", _yes(props.get("Listening"))),
        ("Connections", f"{len(conns)}" + (f" ({', '.join(conns)})" if conns else "")),
        ("Forwarded", str(props.get("MessagesForwarded", 0))),
        ("Denied", str(props.get("MessagesDenied", 0))),
        ("Creator", _creds_text(props.get("Creator", {}))),
        ("Metadata", ""),
    ]
    print("\n".join(_field_lines(fields) + _metadata_lines(props.get("Metadata", {}))))
    return EXIT_OK


# -- identify -----------------------------------------------------------------------------


async def _identify(bus: MessageBus, args: argparse.Namespace) -> int:
    """GetConnectionInfo and GetConnectionCredentials: the app and the real process."""
    name: str = args.bus_name
    try:
        info = await call(bus, "GetConnectionInfo", "s", [name])
        creds_reply = await call(bus, "GetConnectionCredentials", "s", [name])
    except CallError as exc:
        if exc.service_missing():
            raise
        if exc.short_name == "NotContainer":
            raise ClientError(
                f"{name} is not a container connection: it did not connect through a socket "
                f"of this service ({exc.text})",
                EXIT_ERROR,
            ) from exc
        if exc.short_name == "NameHasNoOwner":
            raise ClientError(
                f"no connection named {name} on this bus (it has left, or the name is "
                "misspelt: unique names look like :1.42)",
                EXIT_ERROR,
            ) from exc
        raise
    path, creator, container_type, app_id, instance_id, metadata = info.body
    creds: dict[str, Any] = {k: v.value for k, v in creds_reply.body[0].items()}
    fd_pid: int | None = None
    has_fd = False
    fds = list(creds_reply.unix_fds)
    try:
        if "ProcessFD" in creds:
            index = int(creds.pop("ProcessFD"))
            if 0 <= index < len(fds):
                has_fd = True
                fd_pid = pidfd_pid(fds[index])
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
    if args.json:
        _emit_json(
            {
                "BusName": name,
                "Server": path,
                "ContainerType": container_type,
                "AppID": app_id,
                "InstanceID": instance_id,
                "Metadata": plain(metadata),
                "Creator": _json_creds(creator),
                "ProcessID": creds.get("ProcessID"),
                "ProcessFD": has_fd,
                "ProcessFDPid": fd_pid,
                "Credentials": {
                    k: bytestring(v) if k in _BYTESTRINGS else plain(v) for k, v in creds.items()
                },
            }
        )
        return EXIT_OK
    if has_fd:
        fd_text = f"yes (pidfd for pid {fd_pid})" if fd_pid not in (None, -1) else "yes"
        if fd_pid == -1:
            fd_text = "yes (the process has exited)"
    else:
        fd_text = "no"
    fields = [
        ("Bus name", name),
        ("Server", str(path)),
        ("Container type", str(container_type)),
        ("App ID", str(app_id) or "-"),
        ("Instance ID", str(instance_id) or "-"),
        (
            "Process ID",
            f"{creds.get('ProcessID', '?')} (the process that connected to the server's socket)",
        ),
        ("ProcessFD", fd_text),
        ("User ID", str(creds.get("UnixUserID", "?"))),
        ("Group IDs", ",".join(str(g) for g in creds.get("UnixGroupIDs", [])) or "-"),
    ]
    if "LinuxSecurityLabel" in creds:
        fields.append(("Security label", bytestring(creds["LinuxSecurityLabel"])))
    fields += [("Creator", _creds_text(creator)), ("Metadata", "")]
    print("\n".join(_field_lines(fields) + _metadata_lines(metadata)))
    return EXIT_OK


# -- stop ---------------------------------------------------------------------------------


async def _stop(bus: MessageBus, args: argparse.Namespace) -> int:
    """StopServer, or StopListening with ``--listening-only``."""
    path: str = args.path
    member = "StopListening" if args.listening_only else "StopServer"
    try:
        await call(bus, member, "o", [path])
    except CallError as exc:
        if exc.short_name == "NotContainer":
            raise ClientError(
                f"no such server: {path} (removed already? {NO_SUCH_SERVER_HINT})", EXIT_ERROR
            ) from exc
        if exc.short_name == "AccessDenied":
            raise ClientError(
                f"not allowed to stop {path}: {exc.text} (only its creator's user may, "
                "from outside any container)",
                EXIT_ERROR,
            ) from exc
        raise
    what = "listening" if args.listening_only else "server"
    if args.json:
        _emit_json({"Path": path, "Stopped": what})
    elif args.listening_only:
        print(f"{path}: stopped listening (existing connections keep working)")
    else:
        print(f"{path}: stopped")
    return EXIT_OK
