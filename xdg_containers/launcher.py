"""``xdg-containers run``: ask the service for a server, run a command on it, exit with its status.

The launcher keeps its bus connection (StopOnDisconnect) and the write end of
a pipe whose read end went to AddServer as StopOnNotify: when the command
ends (or the launcher dies), the server stops listening. Exit status: the
command's, 128+N if signal N killed it, 125 when the launcher itself failed,
126/127 when the command cannot be run, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from .anchor.launch import AnchorSpawnError, SpawnedAnchor, spawn_anchor
from .client import (
    NOT_RUNNING,
    PROPERTIES,
    SERVER_INTERFACE,
    CallError,
    ClientError,
    bytestring,
    call,
    choose_address,
    connect,
)
from .policy import PolicyError, parse_rule, policy_from_named_arguments
from .wire.address import AddressError, escape_value, parse_address, system_bus_address

EXT = "org.freedesktop.XdgContainers1."
EXIT_LAUNCHER_FAILED = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
#: The usual system bus socket inside a sandbox.
SANDBOX_SYSTEM_DIR = "/run/dbus"
SANDBOX_SYSTEM_SOCKET = "/run/dbus/system_bus_socket"
#: How long to wait, after the command ended, for the servers to stop listening.
STOP_WAIT = 2.0

_LEVEL_FLAGS = ("see", "talk", "own")
_RULE_FLAGS = ("call", "broadcast")


def _strip_argument_prefix(text: str) -> str:
    """A PolicyError's text without the ``org.freedesktop.XdgContainers1.X: `` prefix."""
    head, sep, rest = text.partition(": ")
    return rest if sep and head.startswith(EXT) else text


def _policy_name(text: str) -> str:
    """argparse type of --see/--talk/--own: a well-known name or ``prefix.*``."""
    try:
        policy_from_named_arguments({text: "see"}, {}, {})
    except PolicyError as exc:
        raise argparse.ArgumentTypeError(_strip_argument_prefix(str(exc))) from None
    return text


def _name_rule(text: str) -> tuple[str, str]:
    """argparse type of --call/--broadcast: ``NAME=RULE`` with a valid name and rule."""
    name, eq, rule = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"expected NAME=RULE, got {text!r}")
    _policy_name(name)
    try:
        parse_rule(rule)
    except PolicyError as exc:
        raise argparse.ArgumentTypeError(f"invalid rule {rule!r} for {name!r}: {exc}") from None
    return name, rule


def _key_value(text: str) -> tuple[str, str]:
    """argparse type of --metadata: ``KEY=VALUE`` with a non-empty key."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_run_parser(sub: Any) -> None:
    """Register ``run``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="run a command in a container (its own D-Bus server)",
        description=(
            "Ask the xdg-containers service on the session bus (starting it if needed) for a "
            "server for this app instance, run COMMAND with DBUS_SESSION_BUS_ADDRESS pointing "
            "at it, and exit with COMMAND's status. The server stops listening when COMMAND "
            "ends."
        ),
        usage="%(prog)s --type T --app-id A [options] -- COMMAND [ARG...]",
    )
    p.add_argument(
        "--type",
        dest="container_type",
        required=True,
        metavar="T",
        help="container type, an interface-like name (org.flatpak)",
    )
    p.add_argument("--app-id", required=True, metavar="A", help="the app's id")
    p.add_argument("--instance-id", metavar="I", help="instance id (default: a random one)")
    p.add_argument(
        "--filter",
        action="store_true",
        help="filter the traffic (xdg-dbus-proxy semantics); default: identify only",
    )
    p.add_argument(
        "--see",
        action="append",
        default=[],
        type=_policy_name,
        metavar="NAME",
        help="NAME (or prefix.*) may be seen (needs --filter; repeatable)",
    )
    p.add_argument(
        "--talk",
        action="append",
        default=[],
        type=_policy_name,
        metavar="NAME",
        help="NAME may be talked to (needs --filter; repeatable)",
    )
    p.add_argument(
        "--own",
        action="append",
        default=[],
        type=_policy_name,
        metavar="NAME",
        help="NAME may be owned (needs --filter; repeatable)",
    )
    p.add_argument(
        "--call",
        action="append",
        default=[],
        type=_name_rule,
        metavar="NAME=RULE",
        help="allow calls to NAME matching RULE [METHOD][@PATH] (needs --filter)",
    )
    p.add_argument(
        "--broadcast",
        action="append",
        default=[],
        type=_name_rule,
        metavar="NAME=RULE",
        help="receive NAME's broadcasts matching RULE (needs --filter)",
    )
    p.add_argument(
        "--metadata",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="string metadata for the server (repeatable)",
    )
    p.add_argument("--log", action="store_true", help="have the service log every message")
    p.add_argument(
        "--sandbox",
        action="store_true",
        help="run COMMAND under bubblewrap with only the minted socket as its bus",
    )
    p.add_argument(
        "--system-bus",
        action="store_true",
        help="also proxy the system bus; sets DBUS_SYSTEM_BUS_ADDRESS",
    )
    p.add_argument(
        "--bus",
        metavar="BUS",
        help="what COMMAND's session bus is proxied to: session, system or an "
        "address (default: the bus the service is on)",
    )
    p.add_argument("--system-bus-address", metavar="ADDR", help=argparse.SUPPRESS)
    p.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command to run, after --"
    )
    p.set_defaults(handler=cmd_run, run_parser=p)


# -- named arguments ----------------------------------------------------------------------


def named_arguments(args: argparse.Namespace) -> dict[str, Variant]:
    """AddServer's named arguments for the filter flags (without StopOnNotify and Bus)."""
    out: dict[str, Variant] = {}
    if args.filter:
        out[EXT + "Filter"] = Variant("b", True)
    policy: dict[str, str] = {}
    for level in _LEVEL_FLAGS:  # later levels are higher, so they win
        for name in getattr(args, level):
            policy[name] = level
    if policy:
        out[EXT + "Policy"] = Variant("a{ss}", policy)
    for flag, key in (("call", "Call"), ("broadcast", "Broadcast")):
        rules: dict[str, list[str]] = {}
        for name, rule in getattr(args, flag):
            rules.setdefault(name, []).append(rule)
        if rules:
            out[EXT + key] = Variant("a{sas}", rules)
    if args.log:
        out[EXT + "Log"] = Variant("b", True)
    return out


def check_usage(args: argparse.Namespace) -> str | None:
    """The usage error in ``args`` (naming the flags), or None."""
    if not args.filter:
        for flag in (*_LEVEL_FLAGS, *_RULE_FLAGS):
            if getattr(args, flag):
                return (
                    f"--{flag} requires --filter (without --filter the traffic is only "
                    "identified, not filtered)"
                )
    if not command_of(args):
        return "no COMMAND given (put it after --)"
    return None


def command_of(args: argparse.Namespace) -> list[str]:
    """COMMAND and its arguments, without a leading ``--``."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return command


# -- the sandbox --------------------------------------------------------------------------


@dataclass
class Sandbox:
    """A bubblewrap command line and the bus addresses valid inside it."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def _host_socket_paths(address: str) -> tuple[list[str], bool]:
    """Filesystem sockets of a bus address, and whether it also has abstract/tcp entries."""
    paths: list[str] = []
    other = False
    try:
        entries = parse_address(address)
    except AddressError:
        return paths, False
    for entry in entries:
        if entry.transport == "unix" and "path" in entry.params:
            paths.append(os.path.realpath(entry.params["path"]))
        else:
            other = True
    return paths, other


#: What of $XDG_RUNTIME_DIR an app in the sandbox keeps: display and sound sockets.
#: Everything else stays on the host side: systemd/private and systemd/notify
#: (control of the user manager), gnupg, keyring, gcr and ssh agents (the user's
#: keys), p11-kit, other containers' sockets, our own state. An allow-list: a new
#: control socket some session adds later is hidden by default.
RUNTIME_ALLOWED = ("wayland-", "pipewire-", "pulse")


def runtime_entry_allowed(entry: str) -> bool:
    """True for $XDG_RUNTIME_DIR entries a sandboxed app may see (display, sound)."""
    return entry.startswith(RUNTIME_ALLOWED)


def _is_within(path: str, directory: str) -> bool:
    """True if ``path`` is ``directory`` or below it."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def sandbox_command(
    command: Sequence[str],
    *,
    runtime_dir: str,
    session_socket: str,
    hide_addresses: Iterable[str],
    system_socket: str | None = None,
    bwrap: str = "bwrap",
) -> Sandbox:
    """The bwrap command running ``command`` with the minted socket(s) as its only bus."""
    # The host's view is kept (--dev-bind / /) except: $XDG_RUNTIME_DIR is a
    # tmpfs holding the host's entries but `bus` and `dbus-1` (no real session
    # bus, no other container's socket; nothing is created on the host), the
    # minted socket is bound at $XDG_RUNTIME_DIR/bus, every socket of
    # hide_addresses is hidden (a tmpfs over its directory, or /dev/null over it
    # when that directory holds the runtime dir), abstract/tcp addresses get a
    # new network namespace, and a new pid namespace closes /proc/PID/root.
    runtime = os.path.realpath(runtime_dir)
    argv = [bwrap, "--dev-bind", "/", "/", "--unshare-pid", "--proc", "/proc", "--die-with-parent"]
    hidden: list[str] = [os.path.realpath(session_socket)]
    if system_socket is not None:
        hidden.append(os.path.realpath(system_socket))
    unshare_net = False
    for address in hide_addresses:
        paths, other = _host_socket_paths(address)
        hidden += paths
        unshare_net = unshare_net or other
    if unshare_net:
        argv.append("--unshare-net")
    skip = {"bus", "dbus-1"}
    tmpfs_dirs: list[str] = []
    null_binds: list[str] = []
    for path in hidden:
        if _is_within(path, runtime):
            rel = os.path.relpath(path, runtime)
            skip.add(rel.split(os.sep, 1)[0])
            continue
        directory = os.path.dirname(path)
        if directory == "/" or _is_within(runtime, directory):
            if os.path.lexists(path) and path not in null_binds:
                null_binds.append(path)
        elif directory not in tmpfs_dirs:
            tmpfs_dirs.append(directory)
    tmpfs_dirs.sort(key=len)
    done: list[str] = []
    for directory in tmpfs_dirs:
        if any(_is_within(directory, d) for d in done) or not os.path.isdir(directory):
            continue
        argv += ["--tmpfs", directory]
        done.append(directory)
    for path in null_binds:
        if not any(_is_within(path, d) for d in done):
            argv += ["--ro-bind", "/dev/null", path]
    argv += ["--perms", "0700", "--tmpfs", runtime]
    for entry in sorted(os.listdir(runtime)):
        if entry in skip or not runtime_entry_allowed(entry):
            continue
        host = os.path.join(runtime, entry)
        if os.path.islink(host):
            argv += ["--symlink", os.readlink(host), host]
        else:
            argv += ["--bind-try", host, host]
    inside_bus = os.path.join(runtime, "bus")
    argv += ["--bind", session_socket, inside_bus]
    env = {"DBUS_SESSION_BUS_ADDRESS": "unix:path=" + escape_value(inside_bus)}
    if system_socket is not None:
        if os.path.isdir(SANDBOX_SYSTEM_DIR) and not os.path.islink(SANDBOX_SYSTEM_DIR):
            inside_system = SANDBOX_SYSTEM_SOCKET
            if not any(_is_within(SANDBOX_SYSTEM_DIR, d) for d in done):
                argv += ["--tmpfs", SANDBOX_SYSTEM_DIR]
        else:
            inside_system = os.path.join(runtime, "system_bus_socket")
        argv += ["--bind", system_socket, inside_system]
        env["DBUS_SYSTEM_BUS_ADDRESS"] = "unix:path=" + escape_value(inside_system)
    argv += ["--", *command]
    return Sandbox(argv, env)


# -- running ------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Handler of ``run``: usage checks, then the launch."""
    problem = check_usage(args)
    if problem is not None:
        parser: argparse.ArgumentParser = args.run_parser
        parser.error(problem)
    try:
        return asyncio.run(_launch(args))
    except ClientError as exc:
        print(f"xdg-containers run: {exc}", file=sys.stderr)
        return EXIT_LAUNCHER_FAILED
    except KeyboardInterrupt:  # before COMMAND started (after, SIGINT is COMMAND's)
        return 128 + signal.SIGINT


@dataclass
class _Minted:
    """One server AddServer made for the command."""

    path: str
    address: str
    socket_path: str


async def _add_server(
    bus: MessageBus,
    args: argparse.Namespace,
    instance_id: str,
    named: dict[str, Variant],
    notify_fd: int,
    anchors: list[SpawnedAnchor],
) -> _Minted:
    """AddServer (activating the service if needed) with StopOnNotify on ``notify_fd`` and
    a new anchor of ours as Connector (appended to ``anchors``)."""
    try:
        anchor = spawn_anchor(args.container_type, args.app_id, instance_id)
    except AnchorSpawnError as exc:
        raise ClientError(str(exc)) from exc
    anchors.append(anchor)
    named = dict(named)
    named["StopOnNotify"] = Variant("h", 0)
    named[EXT + "Connector"] = Variant("h", 1)
    metadata = {k: Variant("s", v) for k, v in args.metadata}
    try:
        reply = await call(
            bus,
            "AddServer",
            "sssa{sv}a{sv}",
            [args.container_type, args.app_id, instance_id, metadata, named],
            auto_start=True,
            unix_fds=[notify_fd, anchor.connector.fileno()],
            timeout=120.0,
        )
    except CallError as exc:
        if exc.service_missing():
            raise ClientError(
                f"{NOT_RUNNING}, and the bus cannot start it ({exc.short_name}: {exc.text}); "
                "is org.freedesktop.DBus.Containers1.service installed?"
            ) from exc
        raise ClientError(f"AddServer failed: {exc.short_name}: {exc.text}") from exc
    anchor.connector.close()  # the service holds its end now
    path, results = reply.body
    address = results.get("Address")
    socket_path = results.get("SocketPath")
    if address is None or socket_path is None:
        raise ClientError(f"AddServer gave {path} no Address/SocketPath")
    return _Minted(str(path), str(address.value), bytestring(socket_path.value))


async def _launch(args: argparse.Namespace) -> int:
    """Mint the server(s), run the command, then stop listening and disconnect."""
    command = command_of(args)
    address = choose_address()
    bus = await connect(address)
    read_end, write_end = os.pipe()
    minted: list[_Minted] = []
    anchors: list[SpawnedAnchor] = []
    try:
        instance_id = args.instance_id if args.instance_id is not None else secrets.token_hex(8)
        named = named_arguments(args)
        main_named = dict(named)
        if args.bus is not None:
            main_named[EXT + "Bus"] = Variant("s", args.bus)
        minted.append(await _add_server(bus, args, instance_id, main_named, read_end, anchors))
        system: _Minted | None = None
        if args.system_bus:
            system_named = dict(named)
            system_named[EXT + "Bus"] = Variant("s", args.system_bus_address or "system")
            system = await _add_server(
                bus, args, instance_id, system_named, read_end, anchors
            )
            minted.append(system)
        os.close(read_end)
        read_end = -1
        env = dict(os.environ)
        for var in ("DBUS_STARTER_ADDRESS", "DBUS_STARTER_BUS_TYPE"):
            env.pop(var, None)
        env["DBUS_SESSION_BUS_ADDRESS"] = minted[0].address
        if system is not None:
            env["DBUS_SYSTEM_BUS_ADDRESS"] = system.address
        argv = command
        if args.sandbox:
            sandbox = _sandbox(args, command, address, minted[0], system)
            argv = sandbox.argv
            env.update(sandbox.env)
        return await _run_command(argv, env)
    finally:
        if read_end >= 0:
            os.close(read_end)
        os.close(write_end)  # StopOnNotify: the servers stop listening now
        try:
            await _wait_stopped(bus, [m.path for m in minted])
        finally:
            bus.disconnect()
            for anchor in anchors:
                anchor.close()


def _sandbox(
    args: argparse.Namespace,
    command: list[str],
    host_address: str,
    session: _Minted,
    system: _Minted | None,
) -> Sandbox:
    """The bwrap wrapper for ``command``, hiding the host's bus sockets."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise ClientError("--sandbox needs bubblewrap (bwrap), which is not installed")
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if not runtime or not os.path.isdir(runtime):
        raise ClientError("--sandbox needs XDG_RUNTIME_DIR set to an existing directory")
    hide = [host_address]
    if args.bus not in (None, "", "session", "system"):
        hide.append(args.bus)
    if system is not None:
        hide.append(args.system_bus_address or system_bus_address())
    return sandbox_command(
        command,
        runtime_dir=runtime,
        session_socket=session.socket_path,
        hide_addresses=hide,
        system_socket=system.socket_path if system is not None else None,
        bwrap=bwrap,
    )


async def _run_command(argv: list[str], env: dict[str, str]) -> int:
    """Run ``argv``; forward SIGTERM/SIGHUP; return its status (128+N for signal N)."""
    loop = asyncio.get_running_loop()
    proc: asyncio.subprocess.Process | None = None
    installed: list[signal.Signals] = []

    def forward(sig: signal.Signals) -> Callable[[], None]:
        """A handler passing ``sig`` on to the command."""

        def handler() -> None:
            """Send the signal if the command still runs."""
            if proc is not None and proc.returncode is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

        return handler

    # Installed before the command starts (a Ctrl-C right after it started must not
    # end the launcher); exec resets them to the default in the command.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, forward(sig))
        installed.append(sig)
    # SIGINT/SIGQUIT from the terminal reach COMMAND directly; the launcher waits for it.
    for sig in (signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, lambda: None)
        installed.append(sig)
    try:
        try:
            proc = await asyncio.create_subprocess_exec(*argv, env=env)
        except FileNotFoundError:
            print(f"xdg-containers run: {argv[0]}: command not found", file=sys.stderr)
            return EXIT_NOT_FOUND
        except OSError as exc:
            print(f"xdg-containers run: {argv[0]}: {exc.strerror}", file=sys.stderr)
            return EXIT_NOT_EXECUTABLE
        status = await proc.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return 128 - status if status < 0 else status


async def _wait_stopped(bus: MessageBus, paths: list[str]) -> None:
    """Wait (briefly) until the servers no longer listen, so the socket is gone on exit."""
    deadline = asyncio.get_running_loop().time() + STOP_WAIT
    for path in paths:
        while asyncio.get_running_loop().time() < deadline:
            try:
                reply = await call(
                    bus,
                    "Get",
                    "ss",
                    [SERVER_INTERFACE, "Listening"],
                    path=path,
                    interface=PROPERTIES,
                    timeout=STOP_WAIT,
                )
            except (CallError, ClientError):
                break  # removed already (or the service is gone)
            if not reply.body[0].value:
                break
            await asyncio.sleep(0.02)
