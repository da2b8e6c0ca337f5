"""The registry on disk: one 0600 JSON file per server in a 0700 directory (SPEC 13).

Each write replaces its file atomically (a temporary file, then rename), so a crash
leaves either the old record or the new one, never half of one. Reading back
treats everything as untrusted: a file that is not ours, not private, too large or
not a valid record is skipped with the reason, never trusted in part.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat

from xdg_containers.servers.record import RecordError, ServerRecord, record_from_json

#: No valid record comes near this; a larger file is refused unread.
MAX_RECORD_BYTES = 256 * 1024
_NAME_RE = re.compile(r"c(0|[1-9][0-9]{0,17})\.json")


def default_directory() -> str:
    """``$XDG_RUNTIME_DIR/xdg-containers/servers``: gone at logout, like the sockets."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        raise OSError("XDG_RUNTIME_DIR is not set; the registry cannot be kept")
    return os.path.join(runtime, "xdg-containers", "servers")


class RegistryStore:
    """Saves, removes and loads server records under one private directory."""

    def __init__(self, directory: str) -> None:
        """Remember ``directory``; it is created (0700) on first use."""
        self.directory = directory

    def _ensure_directory(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        st = os.lstat(self.directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise OSError(f"{self.directory} is not a directory owned by uid {os.getuid()}")
        if st.st_mode & 0o077:
            os.chmod(self.directory, 0o700)

    def _file(self, path: str) -> str:
        return os.path.join(self.directory, path.rsplit("/", 1)[-1] + ".json")

    def save(self, record: ServerRecord) -> None:
        """Write ``record``, replacing any earlier one of the same server, atomically."""
        self._ensure_directory()
        data = json.dumps(record.to_json(), separators=(",", ":")).encode()
        target = self._file(record.path)
        tmp = f"{target}.tmp-{secrets.token_hex(4)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            # No fsync: the rename is atomic against a crash of this process, and the
            # runtime directory does not outlive a reboot (power loss loses it anyway).
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def remove(self, path: str) -> None:
        """Forget the server at object path ``path`` (no error if it was never saved)."""
        try:
            os.unlink(self._file(path))
        except FileNotFoundError:
            pass

    def load(self) -> tuple[list[ServerRecord], list[str]]:
        """Every valid record (by path number) and one line per file that was refused.

        Leftover temporary files of an interrupted write are removed.
        """
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return [], []
        self._ensure_directory()
        records: list[ServerRecord] = []
        problems: list[str] = []
        for name in names:
            full = os.path.join(self.directory, name)
            if ".json.tmp-" in name:
                os.unlink(full)
                continue
            if not _NAME_RE.fullmatch(name):
                problems.append(f"{full}: not a record file name; ignored")
                continue
            try:
                record = _read(full)
            except (OSError, ValueError) as exc:
                problems.append(f"{full}: {exc}; ignored")
                continue
            if self._file(record.path) != full:
                problems.append(f"{full}: holds the record of {record.path}; ignored")
                continue
            records.append(record)
        records.sort(key=lambda r: r.number)
        return records, problems


def _read(full: str) -> ServerRecord:
    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise RecordError("not a regular file")
        if st.st_uid != os.getuid():
            raise RecordError(f"owned by uid {st.st_uid}, not {os.getuid()}")
        if st.st_mode & 0o077:
            raise RecordError(f"mode {stat.S_IMODE(st.st_mode):o} is not private (0600)")
        if st.st_size > MAX_RECORD_BYTES:
            raise RecordError(f"{st.st_size} bytes is over {MAX_RECORD_BYTES}")
        raw = f.read(MAX_RECORD_BYTES + 1)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"not JSON ({exc})") from None
    return record_from_json(data)
