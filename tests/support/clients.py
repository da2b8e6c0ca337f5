"""Real D-Bus clients, one method call each, the outcome normalised to ``("ok", value)`` /
``("error", error_name)``: dbus-send (libdbus), gdbus (GDBus), busctl (sd-bus) and
dbus-python, so that two proxies (or a proxy and the bus) can be compared call by call.
The filter tests add dbus-fast through their World's loop (filter_helpers.py)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TIMEOUT = 10.0



Outcome = tuple[str, Any]
_GDBUS_ERROR = re.compile(r"GDBus\.Error:([A-Za-z0-9_.]+):")
_DBUS_SEND_ERROR = re.compile(r"^Error ([A-Za-z0-9_.]+):", re.M)
_SDBUS_ERROR = re.compile(r"error-name=([A-Za-z0-9_.]+)")


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False
    )


def _gvariant_text(signature: str, args: list[Any]) -> list[str]:
    """Arguments in GVariant text syntax for gdbus."""
    out = []
    for sig, a in zip(signature, args, strict=True):
        if sig == "s":
            out.append("'" + str(a).replace("\\", "\\\\").replace("'", "\\'") + "'")
        elif sig == "u":
            out.append(f"uint32 {a}")
        else:
            raise ValueError(sig)
    return out


@dataclass(frozen=True)
class _Syntax:
    """How a command-line client prints a one-value reply (regexes for re.match)."""

    array: str
    item: str
    true: str
    false: str
    uint: str
    string: str
    empty: str


_GVARIANT = _Syntax("([", r"'([^']*)'", "(true,)", "(false,)", r"\(uint32 (\d+),\)",
                    r"\('([^']*)',\)", "()")
_BUSCTL = _Syntax("as ", r'"([^"]*)"', "b true", "b false", r"u (\d+)$", r's "(.*)"$', "")


def _parse(out: str, syn: _Syntax) -> Any:
    out = out.strip()
    if out.startswith(syn.array):
        return sorted(re.findall(syn.item, out))
    if out in (syn.true, syn.false):
        return out == syn.true
    m = re.match(syn.uint, out)
    if m:
        return int(m.group(1))
    m = re.match(syn.string, out)
    if m:
        return m.group(1)
    return None if out == syn.empty else out


def _parse_dbus_send(out: str) -> Any:
    strings = re.findall(r'^\s*string "(.*)"$', out, re.M)
    if "array [" in out:
        return sorted(strings)
    boolean = re.search(r"^\s*boolean (true|false)$", out, re.M)
    if boolean:
        return boolean.group(1) == "true"
    number = re.search(r"^\s*uint32 (\d+)$", out, re.M)
    if number:
        return int(number.group(1))
    return strings[0] if strings else None


@dataclass(frozen=True)
class Call:
    """One method call a client makes: where to, what, and its arguments."""

    address: str
    dest: str
    path: str
    iface: str
    member: str
    signature: str
    args: list[Any]


def runner_of(backend: Callable[[Call], Outcome]) -> Callable[..., Outcome]:
    """A runner: ``run(address, dest, path, iface, member, signature="", args=None)``."""

    def run(
        address: str,
        dest: str,
        path: str,
        iface: str,
        member: str,
        signature: str = "",
        args: list[Any] | None = None,
    ) -> Outcome:
        return backend(Call(address, dest, path, iface, member, signature, args or []))

    return run


def _cli(
    argv: Callable[[Call], list[str]],
    parse: Callable[[str], Any],
    errors: re.Pattern[str],
    extra_env: dict[str, str] | None = None,
) -> Callable[[Call], Outcome]:
    """A command-line client; the error name is the last ``errors`` match that is not
    ``n/a`` (sd-bus logs several), else the whole stderr."""

    def backend(c: Call) -> Outcome:
        env = {**os.environ, **extra_env} if extra_env else None
        p = _run(argv(c), env)
        if p.returncode == 0:
            return ("ok", parse(p.stdout))
        names = [n for n in errors.findall(p.stderr) if n != "n/a"]
        return ("error", names[-1] if names else p.stderr.strip())

    return backend


_TYPED = {"s": "string", "u": "uint32"}

#: The argv of each command-line client for one call.
CLI_ARGV: dict[str, Callable[[Call], list[str]]] = {
    # libdbus
    "dbus-send": lambda c: [
        "dbus-send", f"--bus={c.address}", "--print-reply", f"--dest={c.dest}", c.path,
        f"{c.iface}.{c.member}",
        *(f"{_TYPED[s]}:{a}" for s, a in zip(c.signature, c.args, strict=True)),
    ],
    # GDBus
    "gdbus": lambda c: [
        "gdbus", "call", "--address", c.address, "--dest", c.dest, "--object-path", c.path,
        "--method", f"{c.iface}.{c.member}", *_gvariant_text(c.signature, c.args),
    ],
    # sd-bus
    "busctl": lambda c: [
        "busctl", f"--address={c.address}", "call", c.dest, c.path, c.iface, c.member,
        *([c.signature, *map(str, c.args)] if c.signature else []),
    ],
}
run_dbus_send = runner_of(_cli(CLI_ARGV["dbus-send"], _parse_dbus_send, _DBUS_SEND_ERROR))
run_gdbus = runner_of(_cli(CLI_ARGV["gdbus"], lambda out: _parse(out, _GVARIANT), _GDBUS_ERROR))
#: The error name comes from sd-bus's debug log.
run_busctl = runner_of(
    _cli(CLI_ARGV["busctl"], lambda out: _parse(out, _BUSCTL), _SDBUS_ERROR,
         {"SYSTEMD_LOG_LEVEL": "debug"})
)


def _dbus_python(c: Call) -> Outcome:
    """dbus-python (libdbus underneath), blocking call on a private connection."""
    import dbus
    import dbus.bus

    conn = dbus.bus.BusConnection(c.address)
    try:
        value = conn.call_blocking(
            c.dest, c.path, c.iface, c.member, c.signature, c.args, timeout=TIMEOUT
        )
    except dbus.exceptions.DBusException as exc:
        return ("error", exc.get_dbus_name())
    finally:
        conn.close()
    if isinstance(value, dbus.Array):
        return ("ok", sorted(str(v) for v in value))
    if isinstance(value, dbus.Boolean):
        return ("ok", bool(value))
    if isinstance(value, (dbus.UInt32, dbus.Int32)):
        return ("ok", int(value))
    if isinstance(value, dbus.String):
        return ("ok", str(value))
    return ("ok", value)


run_dbus_python = runner_of(_dbus_python)
