"""``xdg-containers run --sandbox``: the bubblewrap command line that leaves COMMAND the
minted socket(s) as its only bus, hiding the host's bus sockets and other containers'."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .wire.address import AddressError, escape_value, parse_address

#: The usual system bus socket inside a sandbox.
SANDBOX_SYSTEM_DIR = "/run/dbus"
SANDBOX_SYSTEM_SOCKET = "/run/dbus/system_bus_socket"


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
