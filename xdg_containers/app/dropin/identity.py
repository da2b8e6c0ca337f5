"""Who the drop-in serves: the triple and metadata from ``/.flatpak-info`` (pure).

Inside flatpak's proxy sandbox ``/.flatpak-info`` is a copy of the app's: container
type ``org.flatpak``, app id ``[Application] name``, instance id ``[Instance]
instance-id``. Without it (the drop-in run by hand, or by another launcher) the
type is the neutral ``org.freedesktop.XdgDbusProxy`` with empty ids
(docs/flatpak.md, "Identity").
"""

from __future__ import annotations

from dataclasses import dataclass, field

FLATPAK_INFO = "/.flatpak-info"
FLATPAK_TYPE = "org.flatpak"
NEUTRAL_TYPE = "org.freedesktop.XdgDbusProxy"
#: Metadata keys (all strings): where a host process finds the identity file, and
#: the runtime the app runs on.
META_INFO_PATH = "org.flatpak.InfoPath"
META_RUNTIME = "org.flatpak.Runtime"
META_BRANCH = "org.flatpak.Branch"
META_ARCH = "org.flatpak.Arch"
META_RUNTIME_COMMIT = "org.flatpak.RuntimeCommit"
META_APP_COMMIT = "org.flatpak.AppCommit"
#: Values longer than this are left out (the service caps the metadata's total size).
MAX_VALUE = 512


@dataclass
class Identity:
    """AddServer's container type, app id, instance id and string metadata."""

    container_type: str = NEUTRAL_TYPE
    app_id: str = ""
    instance_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def parse_keyfile(text: str) -> dict[str, dict[str, str]]:
    """A GKeyFile's groups and keys (first value wins; comments and junk skipped)."""
    groups: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = groups.setdefault(line[1:-1], {})
            continue
        key, eq, value = line.partition("=")
        if eq and current is not None:
            current.setdefault(key.strip(), _unescape(value.strip()))
    return groups


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    out = []
    it = iter(value)
    for c in it:
        if c != "\\":
            out.append(c)
            continue
        nxt = next(it, "")
        out.append({"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}.get(nxt, "\\" + nxt))
    return "".join(out)


def identity_from_keyfile(text: str, info_path: str) -> Identity:
    """The identity a ``.flatpak-info`` names; ``info_path`` is where the host sees it."""
    groups = parse_keyfile(text)
    app = groups.get("Application", {})
    instance = groups.get("Instance", {})
    meta = {META_INFO_PATH: info_path}
    runtime = app.get("runtime", "")
    for key, value in (
        (META_RUNTIME, runtime),
        (META_BRANCH, instance.get("branch", "") or app.get("branch", "")),
        (META_ARCH, instance.get("arch", "")),
        (META_APP_COMMIT, instance.get("app-commit", "")),
        (META_RUNTIME_COMMIT, instance.get("runtime-commit", "")),
    ):
        if value and len(value) <= MAX_VALUE:
            meta[key] = value
    name = app.get("name", "")
    if len(name) > MAX_VALUE:
        name = ""
    instance_id = instance.get("instance-id", "")
    if len(instance_id) > MAX_VALUE:
        instance_id = ""
    return Identity(FLATPAK_TYPE, name, instance_id, meta)


def read_identity(pid: int, path: str = FLATPAK_INFO) -> Identity:
    """This process's identity: from ``path`` when it exists, else the neutral one."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read(65536)
    except OSError:
        return Identity()
    return identity_from_keyfile(text, f"/proc/{pid}/root{path}")
