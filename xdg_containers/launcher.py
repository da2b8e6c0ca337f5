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
from collections.abc import Callable
from dataclasses import dataclass
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
from .launcher_args import EXT, add_run_arguments, check_usage, command_of, named_arguments
from .launcher_sandbox import Sandbox, sandbox_command
from .wire.address import system_bus_address

EXIT_LAUNCHER_FAILED = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
#: What to do without a session bus: ``run`` has no bus flags, it reaches the service
#: on the session bus only.
NO_BUS_HINT = (
    "set DBUS_SESSION_BUS_ADDRESS to the bus the service is on ('xdg-containers serve "
    "--private' starts one and prints its address)"
)
#: What to do about AddServer refusals a user can act on.
REFUSAL_HINTS = {
    "LimitsExceeded": "; stop servers no longer needed ('xdg-containers list', "
    "'xdg-containers stop PATH') or raise the service's limit ('xdg-containers serve "
    "--limit NAME=VALUE' or its config file)",
    "AccessDenied": "; a confined app cannot create servers: run this outside the container",
    "InvalidArgs": "; see 'xdg-containers run --help' for the accepted values",
}
#: How long to wait, after the command ended, for the servers to stop listening.
STOP_WAIT = 2.0


def add_run_parser(sub: Any) -> None:
    """Register ``run`` (flags in launcher_args.py) with its handler."""
    p = add_run_arguments(sub)
    p.set_defaults(handler=cmd_run, run_parser=p)


def cmd_run(args: argparse.Namespace) -> int:
    """Handler of ``run``: usage checks, then the launch."""
    problem = check_usage(args)
    if problem is not None:
        parser: argparse.ArgumentParser = args.run_parser
        parser.error(problem)
    try:
        return asyncio.run(_launch(args))
    except ClientError as exc:
        print(f"xdg-containers run: COMMAND not started: {exc}", file=sys.stderr)
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
        missing = shutil.which("bwrap") is None
        hint = "; install it (apt-get install bubblewrap)" if missing else ""
        raise ClientError(f"cannot start the app's anchor: {exc}{hint}") from exc
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
                "start it with 'xdg-containers serve', or install its D-Bus activation file "
                "(meson install puts org.freedesktop.DBus.Containers1.service in "
                "share/dbus-1/services)"
            ) from exc
        raise ClientError(
            f"AddServer failed: {exc.short_name}: {exc.text}{_refusal_hint(exc.short_name)}"
        ) from exc
    anchor.connector.close()  # the service holds its end now
    path, results = reply.body
    address = results.get("Address")
    socket_path = results.get("SocketPath")
    if address is None or socket_path is None:
        raise ClientError(
            f"the service made {path} but gave no Address/SocketPath to hand to COMMAND; "
            "it is not a Containers1 service this launcher can use"
        )
    return _Minted(str(path), str(address.value), bytestring(socket_path.value))


async def _launch(args: argparse.Namespace) -> int:
    """Mint the server(s), run the command, then stop listening and disconnect."""
    command = command_of(args)
    address = choose_address(no_bus_hint=NO_BUS_HINT)
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
        raise ClientError(
            "--sandbox needs bubblewrap (bwrap), which is not installed; install it "
            "(apt-get install bubblewrap) or run without --sandbox"
        )
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if not runtime or not os.path.isdir(runtime):
        raise ClientError(
            "--sandbox needs XDG_RUNTIME_DIR set to an existing directory (the sandbox's "
            "runtime dir is made from it); set it, or run without --sandbox"
        )
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
            print(
                f"xdg-containers run: {argv[0]}: command not found in PATH; check the "
                "name, or give the full path",
                file=sys.stderr,
            )
            return EXIT_NOT_FOUND
        except OSError as exc:
            print(
                f"xdg-containers run: cannot run {argv[0]}: {exc.strerror} (is it an "
                "executable file, with execute permission?)",
                file=sys.stderr,
            )
            return EXIT_NOT_EXECUTABLE
        status = await proc.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return 128 - status if status < 0 else status


def _refusal_hint(error: str) -> str:
    """What the user can do about AddServer's ``error`` ("" when nothing in particular)."""
    return REFUSAL_HINTS.get(error, "")


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
