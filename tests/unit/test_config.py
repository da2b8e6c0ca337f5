"""Tests for xdg_containers.config: SPEC §7 defaults, the INI [limits] file and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from xdg_containers.config import ConfigError, Limits, load_config

MIB = 1024 * 1024


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "limits.ini"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_spec_values() -> None:
    limits = Limits()
    assert limits.max_servers == 512
    assert limits.max_servers_per_uid == 64
    assert limits.max_connections_per_server == 64
    assert limits.max_metadata_bytes == 4096
    assert limits.max_message_bytes == 128 * MIB
    assert limits.max_pending_bytes_per_connection > 0
    assert limits.auth_timeout == 30000  # ms, dbus-daemon's name and default


def test_no_file_gives_defaults() -> None:
    assert load_config(None) == Limits()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Limits()
    assert load_config(write(tmp_path, "# nothing\n[limits]\n")) == Limits()


def test_limits_section_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# comment\n[limits]\nmax_servers = 10\nmax_servers_per_uid=2\n"
        "max_message_bytes = 1048576\nmax-connections-per-server = 0x10\n",
    )
    limits = load_config(path)
    assert limits == Limits(
        max_servers=10,
        max_servers_per_uid=2,
        max_connections_per_server=16,
        max_message_bytes=MIB,
    )


def test_every_limit_can_be_set(tmp_path: Path) -> None:
    names = [
        "max_servers",
        "max_servers_per_uid",
        "max_connections_per_server",
        "max_metadata_bytes",
        "max_message_bytes",
        "max_pending_bytes_per_connection",
    ]
    text = "[limits]\n" + "".join(f"{n} = {i + 3}\n" for i, n in enumerate(names))
    limits = load_config(write(tmp_path, text))
    assert [getattr(limits, n) for n in names] == [3, 4, 5, 6, 7, 8]


def test_command_line_overrides_win(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_servers = 10\nmax_servers_per_uid = 3\n")
    limits = load_config(path, {"max_servers": "20", "max-metadata-bytes": " 100 "})
    assert (limits.max_servers, limits.max_servers_per_uid, limits.max_metadata_bytes) == (
        20,
        3,
        100,
    )
    assert load_config(None, {"max_servers": "7"}).max_servers == 7


def test_with_overrides_returns_a_copy() -> None:
    base = Limits()
    changed = base.with_overrides({"max_servers": "1"})
    assert changed.max_servers == 1
    assert base.max_servers == 512


def test_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown limit 'max_sevrers' \(known: .*max_servers"):
        load_config(write(tmp_path, "[limits]\nmax_sevrers = 1\n"))
    with pytest.raises(ConfigError, match="unknown limit 'bogus'"):
        load_config(None, {"bogus": "1"})


@pytest.mark.parametrize("value", ["ten", "1.5", "", "12abc", "1e3"])
def test_non_integer(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=f"limit max_servers must be an integer, not {value!r}"):
        load_config(write(tmp_path, f"[limits]\nmax_servers = {value}\n"))


def test_percent_in_a_value_is_a_config_error(tmp_path: Path) -> None:
    # BUG: config.py:51 (load_config) builds configparser.ConfigParser() with the default
    # BasicInterpolation, so "10%" makes parser.items("limits") (line 63, outside the
    # try) raise configparser.InterpolationSyntaxError instead of ConfigError.
    # Fix: configparser.ConfigParser(interpolation=None).
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(write(tmp_path, "[limits]\nmax_servers = 10%\n"))


@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="max_servers must be positive"):
        load_config(write(tmp_path, f"[limits]\nmax_servers = {value}\n"))


def test_message_limit_cannot_exceed_the_spec(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_message_bytes cannot exceed 134217728"):
        load_config(write(tmp_path, f"[limits]\nmax_message_bytes = {128 * MIB + 1}\n"))
    assert load_config(None, {"max_message_bytes": str(128 * MIB)}).max_message_bytes == 128 * MIB


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown section \[server\]"):
        load_config(write(tmp_path, "[limits]\nmax_servers = 1\n[server]\nx = 1\n"))


def test_default_section_is_not_silently_ignored(tmp_path: Path) -> None:
    # BUG: config.py:59-63: configparser treats [DEFAULT] specially: parser.sections()
    # omits it, so a file with only "[DEFAULT] max_servers = 3" passes the unknown-section
    # check and the setting is silently dropped (and with a [limits] section present, its
    # keys are silently merged into [limits]). Fix: reject parser.defaults() when non-empty
    # (or construct the parser with default_section set to a name no file can use).
    with pytest.raises(ConfigError, match="DEFAULT"):
        load_config(write(tmp_path, "[DEFAULT]\nmax_servers = 3\n"))


def test_keys_without_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no section headers"):
        load_config(write(tmp_path, "max_servers = 3\n"))


def test_duplicate_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="already exists"):
        load_config(write(tmp_path, "[limits]\nmax_servers = 1\nmax_servers = 2\n"))


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ini"
    with pytest.raises(ConfigError, match=f"cannot read config file {missing}"):
        load_config(missing)
