"""The anchor's sandbox: the host read-only plus one identity file (pure: builds argv and text).

An anchor's ``/proc/PID/root`` is what pid-based consumers read. For
``org.flatpak`` it holds ``/.flatpak-info`` naming the app and instance, so
xdg-desktop-portal applies that app's permissions; any other container type
gets ``/.xdg-containers-info`` with the same triple. Everything else is the
host, read-only (the anchor only connects to bus sockets).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from xdg_containers.anchor.binary import PROGRAM as PROGRAM  # re-exported: where program.py is
from xdg_containers.anchor.binary import anchor_command

FLATPAK = "org.flatpak"


def identity_kind(container_type: str) -> str:
    """``flatpak`` (``/.flatpak-info``) for org.flatpak, else ``xdg``."""
    return "flatpak" if container_type == FLATPAK else "xdg"


def identity_path(container_type: str) -> str:
    """Where the identity file appears in the anchor's root."""
    return "/.flatpak-info" if container_type == FLATPAK else "/.xdg-containers-info"


def _keyfile_value(value: str) -> str:
    """Escape a value as GKeyFile does, so no app id can add keys or groups."""
    out = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    out = out.replace("\t", "\\t")
    if out.startswith(" "):
        out = "\\s" + out[1:]
    return out


def identity_text(
    container_type: str, app_id: str, instance_id: str, extra: Iterable[tuple[str, str]] = ()
) -> str:
    """The identity file: flatpak's keyfile layout for org.flatpak, our own otherwise."""
    app = _keyfile_value(app_id)
    inst = _keyfile_value(instance_id)
    if container_type == FLATPAK:
        lines = ["[Application]", f"name={app}", "", "[Instance]", f"instance-id={inst}"]
    else:
        lines = [
            "[Container]",
            f"type={_keyfile_value(container_type)}",
            f"app-id={app}",
            f"instance-id={inst}",
        ]
    lines.extend(f"{_keyfile_value(k)}={_keyfile_value(v)}" for k, v in extra)
    return "\n".join(lines) + "\n"


def host_readonly_args(root: str = "/") -> list[str]:
    """bwrap arguments showing every top-level entry of the host read-only (``/dev`` minimal)."""
    args: list[str] = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name in (".flatpak-info", ".xdg-containers-info", ".xdg-containers-anchor"):
            continue
        if name == "dev":
            args += ["--dev", "/dev"]
        elif os.path.islink(path):
            args += ["--symlink", os.readlink(path), "/" + name]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, "/" + name]
    return args


def zygote_argv(bwrap: str, kind: str, ctl_fd: int, placeholder_fd: int) -> list[str]:
    """bwrap running the anchor zygote: host read-only, an empty placeholder for ``kind``'s
    identity file and a staging tmpfs; CAP_SYS_ADMIN so each forked anchor can bind its
    own identity file in a mount namespace of its own."""
    target = "/.flatpak-info" if kind == "flatpak" else "/.xdg-containers-info"
    return [
        bwrap,
        *host_readonly_args(),
        "--file",
        str(placeholder_fd),
        target,
        "--tmpfs",
        "/.xdg-containers-anchor",
        "--cap-add",
        "CAP_SYS_ADMIN",
        "--die-with-parent",
        "--",
        *anchor_command(),
        "zygote",
        str(ctl_fd),
        kind,
    ]


def anchor_argv(bwrap: str, container_type: str, anchor_fd: int, identity_fd: int) -> list[str]:
    """bwrap running one anchor (``serve``) with the identity file read from ``identity_fd``.

    Not tied to its parent: it must outlive the server's connections, which may
    outlive the launcher; it exits when the service closes the Connector."""
    return [
        bwrap,
        *host_readonly_args(),
        "--ro-bind-data",
        str(identity_fd),
        identity_path(container_type),
        "--",
        *anchor_command(),
        "serve",
        str(anchor_fd),
    ]
