"""``xdg-containers-dbus-proxy``: entry point; parse, listen, sync, then serve (SPEC 11).

The start-up path imports only what parsing and binding need: the sync byte
goes out as soon as every group's socket listens (clients that connect before
the servers are set up wait in the listen backlog, as they would while
xdg-dbus-proxy's main loop starts). Serving comes after: by the Containers1
service (backed.py, no asyncio) or, when it cannot be reached within 2 s or
``--log`` is given, in this process (inprocess.py, asyncio imported then).
Should the service go away later, recovery.py registers the groups again and
serves them meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time

from xdg_containers.app.dropin.anchorloop import (
    FRONT_EXE,
    FRONT_FDS,
    RESUME,
    SERVICE_NAME,
    parse_fd_list,
    parse_resume,
)
from xdg_containers.app.dropin.args import ArgsError, EarlyExit, Group, parse, read_all

#: How long the service gets to answer every AddServer before we serve ourselves.
SERVICE_TIMEOUT = 2.0
#: ``in-process`` forces the in-process mode; ``service`` never falls back (tests).
MODE_VARIABLE = "XDG_CONTAINERS_DROPIN_MODE"
#: Set by the C front (front.c), which parsed, bound every PATH and sent the sync byte:
#: the listening sockets, one per group in order (FRONT_FDS); and the name it was run
#: by. FRONT_EXE is the C front's own path: once the service took the groups, this
#: process becomes ``FRONT --anchor-loop`` (same pid, ~100 KiB instead of an
#: interpreter), which execs us back with RESUME when the service needs a look.
FRONT_ARGV0 = "XDG_CONTAINERS_DROPIN_ARGV0"
PREFIX = "xdg-containers-dbus-proxy: "


def session_bus_address() -> str | None:
    """The session bus: ``DBUS_SESSION_BUS_ADDRESS``, else ``$XDG_RUNTIME_DIR/bus``."""
    address = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if address:
        return address
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.exists(os.path.join(runtime, "bus")):
        return "unix:path=" + os.path.join(runtime, "bus")
    return None


def listen_at(path: str) -> socket.socket:
    """A listening unix socket at ``path``, replacing what is there (flatpak's placeholder)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _terminate(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    """Run the drop-in; the exit status (1 for a bad command line, as xdg-dbus-proxy)."""
    args = sys.argv[1:] if argv is None else argv
    front_fds = os.environ.pop(FRONT_FDS, None)
    front_exe = os.environ.pop(FRONT_EXE, None)
    resume = os.environ.pop(RESUME, None)
    service_name = os.environ.pop(SERVICE_NAME, "")
    argv0 = os.environ.pop(FRONT_ARGV0, None) or sys.argv[0] or "xdg-containers-dbus-proxy"
    try:
        options = parse(args, read_all, argv0)
    except EarlyExit as exc:
        (sys.stderr if exc.to_stderr else sys.stdout).write(exc.text)
        return exc.code
    except ArgsError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    groups = options.groups
    if front_fds is not None and resume is not None:
        return _resume(groups, front_fds, resume, service_name, options.sync_fd, front_exe, args)
    if front_fds is not None:
        return _after_front(groups, front_fds, options.sync_fd, front_exe, args)
    listeners: list[socket.socket] = []
    made: list[str] = []
    for group in groups:
        try:
            listeners.append(listen_at(group.path))
        except OSError as exc:
            sys.stderr.write(f"Failed to start proxy for {group.address}: {exc.strerror or exc}\n")
            for sock in listeners:
                sock.close()
            _unlink_all(made)
            return 1
        made.append(group.path)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if options.sync_fd is not None:
            try:
                os.write(options.sync_fd, b"x")
            except OSError as exc:
                sys.stderr.write(f"{PREFIX}can't write to sync socket: {exc.strerror}\n")
        return _serve(groups, listeners, options.sync_fd, None, args)
    except KeyboardInterrupt:
        return 0
    finally:
        _unlink_all(made)


def _after_front(
    groups: list[Group], fds_text: str, sync_fd: int | None, front_exe: str | None,
    args: list[str],
) -> int:
    """Serve the sockets the C front bound (it sent the sync byte already)."""
    paths = [g.path for g in groups]
    try:
        fds = [int(x) for x in fds_text.split(",")]
        if len(fds) != len(groups):
            raise ValueError(f"{len(fds)} sockets for {len(groups)} groups")
        listeners = [socket.socket(fileno=fd) for fd in fds]
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"{PREFIX}bad {FRONT_FDS}={fds_text!r}: {exc}\n")
        _unlink_all(paths)
        return 1
    for sock in listeners:
        sock.set_inheritable(False)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _serve(groups, listeners, sync_fd, front_exe, args)
    except KeyboardInterrupt:
        return 0
    finally:
        _unlink_all(paths)


def _resume(
    groups: list[Group], fds_text: str, resume: str, service_name: str,
    sync_fd: int | None, front_exe: str | None, args: list[str],
) -> int:
    """The C front's anchor loop handed the process back (recovery.py)."""
    paths = [g.path for g in groups]
    try:
        listeners = [None if fd < 0 else socket.socket(fileno=fd)
                     for fd in parse_fd_list(fds_text, len(groups))]
        state = parse_resume(resume, len(groups), service_name)
        bus = socket.socket(fileno=state.bus_fd)
        connectors = {i: socket.socket(fileno=fd)
                      for i, fd in enumerate(state.connector_fds) if fd >= 0}
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"{PREFIX}bad {FRONT_FDS}={fds_text!r} {RESUME}={resume!r}: {exc}\n")
        _unlink_all(paths)
        return 1
    for sock in (bus, *connectors.values(), *listeners):
        if sock is not None:
            sock.set_inheritable(False)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _recover(groups, listeners, (bus, connectors, service_name), sync_fd,
                        front_exe, args)
    except KeyboardInterrupt:
        return 0
    finally:
        _unlink_all(paths)


def _full_python() -> None:
    """Started with -S (the installed script, for start-up time): asyncio's engine needs
    dbus-fast from site-packages."""
    if sys.flags.no_site:
        import site

        site.main()


def _recover(
    groups: list[Group],
    listeners: list[socket.socket | None],
    registration: tuple[socket.socket, dict[int, socket.socket], str],
    sync_fd: int | None,
    front_exe: str | None,
    args: list[str],
) -> int:
    from xdg_containers.app.dropin.identity import read_identity

    address = session_bus_address()
    if address is None:  # pragma: no cover - it was there when the groups were set up
        sys.stderr.write(f"{PREFIX}no session bus address to register again on\n")
        address = "unix:path=/nonexistent"
    _full_python()
    from xdg_containers.app.dropin.recovery import recover

    identity = read_identity(os.getpid())
    try:
        return recover(address, groups, identity, listeners, registration, sync_fd,
                       front_exe, args)
    except Exception:
        # A fault of ours must not cost the app its bus: its sockets are still open.
        import traceback

        traceback.print_exc()
        sys.stderr.write(f"{PREFIX}internal error while the service was away; serving in "
                         "this process from now on\n")
    from xdg_containers.app.dropin.inprocess import run

    alive = [i for i, sock in enumerate(listeners) if sock is not None]
    return run([groups[i] for i in alive], [s for s in listeners if s is not None], identity,
               sync_fd)


def _serve(
    groups: list[Group],
    listeners: list[socket.socket],
    sync_fd: int | None,
    front_exe: str | None,
    args: list[str],
) -> int:
    from xdg_containers.app.dropin.identity import read_identity

    identity = read_identity(os.getpid())
    mode = os.environ.get(MODE_VARIABLE, "")
    if mode != "in-process" and not any(g.log for g in groups):
        from xdg_containers.app.dropin.backed import TROUBLE, ServiceBacked, SetupError

        address = session_bus_address()
        problem = "no session bus address"
        if address is not None:
            backed = ServiceBacked(address, groups, identity)
            try:
                backed.setup(listeners, time.monotonic() + SERVICE_TIMEOUT)
            except SetupError as exc:
                problem = str(exc)
            else:
                # The service accepts on them; our copies are kept (never accepted on
                # here unless it goes away: recovery.py) to register them again.
                assert backed.bus is not None
                if front_exe:
                    from xdg_containers.app.dropin.anchorloop import exec_anchor_loop

                    exec_anchor_loop(
                        front_exe, sync_fd, backed.bus.fileno(),
                        [c.fileno() for c in backed.connectors],
                        [sock.fileno() for sock in listeners],
                        [g.path for g in groups], args, backed.service_name,
                    )
                status = backed.run(sync_fd)
                if status != TROUBLE:
                    backed.close()
                    return status
                connectors = dict(enumerate(backed.connectors))
                return _recover(groups, list(listeners),
                                (backed.bus, connectors, backed.service_name),
                                sync_fd, front_exe, args)
        if mode == "service":
            sys.stderr.write(f"{PREFIX}the xdg-containers service is unusable: {problem}\n")
            return 1
        sys.stderr.write(
            f"{PREFIX}the xdg-containers service is unusable ({problem}); "
            "serving in this process\n"
        )
    _full_python()
    from xdg_containers.app.dropin.inprocess import run

    return run(groups, listeners, identity, sync_fd)


if __name__ == "__main__":
    sys.exit(main())
