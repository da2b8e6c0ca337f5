"""Service limits: defaults from the SPEC, overridable by a config file and the command line."""

from __future__ import annotations

import configparser
from dataclasses import dataclass, fields, replace
from pathlib import Path

from xdg_containers.wire.header import SPEC_MAX_MESSAGE_BYTES


class ConfigError(ValueError):
    """The config file or an override is not valid."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one service instance (see docs/design.md, "Limits")."""

    max_servers: int = 512
    max_servers_per_uid: int = 64
    max_connections_per_server: int = 64
    max_metadata_bytes: int = 4096
    max_message_bytes: int = SPEC_MAX_MESSAGE_BYTES
    max_pending_bytes_per_connection: int = 8 * 1024 * 1024
    #: Milliseconds a connection may take from accept to its Hello (dbus-daemon's name).
    auth_timeout: int = 30000
    #: Unix fds one connection may hold in messages not yet forwarded (partial ones and
    #: ones queued while the client's Hello is answered): dbus-daemon's
    #: max_incoming_unix_fds default, 4 messages of its 16 (max_message_unix_fds).
    max_fds_per_connection: int = 64
    #: Milliseconds a client's message may sit unfinished without a byte of progress.
    idle_partial_message_timeout: int = 30000
    #: Bytes held in partial messages and queues over all connections of the service.
    max_buffered_bytes: int = 512 * 1024 * 1024

    def with_overrides(self, overrides: dict[str, str]) -> Limits:
        """A copy with ``name=value`` overrides applied (values are integers)."""
        known = {f.name for f in fields(self)}
        values: dict[str, int] = {}
        for key, raw in overrides.items():
            name = key.strip().replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown limit {key!r} (known: {', '.join(sorted(known))})")
            try:
                value = int(raw.strip(), 0)
            except ValueError as exc:
                raise ConfigError(f"limit {key} must be an integer, not {raw!r}") from exc
            if value < 1:
                raise ConfigError(f"limit {key} must be positive")
            if name == "max_message_bytes" and value > SPEC_MAX_MESSAGE_BYTES:
                raise ConfigError(f"max_message_bytes cannot exceed {SPEC_MAX_MESSAGE_BYTES}")
            values[name] = value
        return replace(self, **values)


def load_config(path: str | Path | None, overrides: dict[str, str] | None = None) -> Limits:
    """Read ``[limits]`` from an INI file, then apply command-line overrides."""
    limits = Limits()
    if path is not None:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as fh:
                parser.read_file(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except configparser.Error as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        if parser.defaults():
            raise ConfigError(f"config file {path}: put limits under [limits], not [DEFAULT]")
        for section in parser.sections():
            if section != "limits":
                raise ConfigError(f"config file {path}: unknown section [{section}]")
        if parser.has_section("limits"):
            limits = limits.with_overrides(dict(parser.items("limits")))
    if overrides:
        limits = limits.with_overrides(overrides)
    return limits
