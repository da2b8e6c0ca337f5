"""binary.anchor_command's order: $XDG_CONTAINERS_ANCHOR, meson's path, <prefix>/libexec, Python.

Each case runs a fresh interpreter with its own environment and ``sys.prefix`` pointing
at a real temporary prefix, with or without an executable anchor in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from xdg_containers.anchor.binary import BINARY, ENV, PROGRAM, describe, python_command

REPO = Path(__file__).resolve().parents[2]
_PROBE = """
import json, sys
sys.prefix = sys.argv[1]
from xdg_containers.anchor.binary import anchor_command
print(json.dumps(anchor_command()))
"""


def choice(prefix: Path, override: str | None = None) -> list[str]:
    """anchor_command() in a child whose sys.prefix is ``prefix``."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["PYTHONPATH"] = str(REPO)
    if override is not None:
        env[ENV] = override
    out = subprocess.run([sys.executable, "-c", _PROBE, str(prefix)], env=env, cwd=str(prefix),
                         capture_output=True, text=True, timeout=30, check=True).stdout
    result: list[str] = json.loads(out)
    return result


def _anchor_in(prefix: Path, mode: int) -> Path:
    (prefix / "libexec").mkdir()
    path = prefix / "libexec" / BINARY
    path.write_bytes(b"#!/bin/sh\n")
    path.chmod(mode)
    return path


def test_prefix_libexec_binary_is_preferred(tmp_path: Path) -> None:
    """An executable <sys.prefix>/libexec/xdg-containers-anchor is the default."""
    path = _anchor_in(tmp_path, 0o755)
    assert choice(tmp_path) == [str(path)]


def test_python_anchor_without_a_binary(tmp_path: Path) -> None:
    """No binary, or one that is not executable: program.py under the same interpreter."""
    assert choice(tmp_path) == [sys.executable, "-I", "-S", PROGRAM]
    _anchor_in(tmp_path, 0o644)
    assert choice(tmp_path) == [sys.executable, "-I", "-S", PROGRAM]


def test_environment_overrides(tmp_path: Path) -> None:
    """XDG_CONTAINERS_ANCHOR=python forces program.py over a built binary; a path (made
    absolute: bwrap's working directory is not ours) wins over everything."""
    _anchor_in(tmp_path, 0o755)
    assert choice(tmp_path, "python") == [sys.executable, "-I", "-S", PROGRAM]
    assert choice(tmp_path, "/opt/anchor") == ["/opt/anchor"]
    assert choice(tmp_path, "rel/anchor") == [str(tmp_path / "rel" / "anchor")]
    assert choice(tmp_path, "") == [str(tmp_path / "libexec" / BINARY)]


def test_describe_names_the_kind() -> None:
    """The log phrase says which implementation runs."""
    assert describe(python_command()).startswith("the Python anchor")
    assert describe(["/usr/libexec/" + BINARY]) == f"the C anchor (/usr/libexec/{BINARY})"
