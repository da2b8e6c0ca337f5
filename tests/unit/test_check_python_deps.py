"""tools/check-python-deps, the module check `meson setup` runs: requirement parsing,
version comparison, and its verdict on this Python's real dbus-fast."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_tool() -> ModuleType:
    """The tool as a module (its file has no .py suffix)."""
    path = ROOT / "tools" / "check-python-deps"
    loader = importlib.machinery.SourceFileLoader("check_python_deps", str(path))
    spec = importlib.util.spec_from_loader("check_python_deps", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_python_deps"] = module  # dataclasses look the module up by name
    loader.exec_module(module)
    return module


tool = load_tool()


def test_parse_requirement_names_module_and_debian_package() -> None:
    req = tool.parse_requirement("dbus-fast>=1.84.2")
    assert req.name == "dbus-fast"
    assert req.clauses == ((">=", "1.84.2"),)
    assert req.module == "dbus_fast"
    assert req.debian == "python3-dbus-fast"


def test_parse_requirement_several_clauses_and_spaces() -> None:
    req = tool.parse_requirement(" dbus-fast >= 1.84 , < 6, != 5.0.1 ")
    assert req.clauses == ((">=", "1.84"), ("<", "6"), ("!=", "5.0.1"))
    assert tool.parse_requirement("dbus-fast").clauses == ()


@pytest.mark.parametrize(
    "text", ["dbus-fast[extra]>=1", "dbus-fast>=1; python_version<'3.12'", "dbus-fast~=1.8", ""]
)
def test_parse_requirement_refuses_what_it_cannot_read(text: str) -> None:
    """A form it does not understand is an error naming it, never a silent pass."""
    with pytest.raises(ValueError, match="cannot read the requirement"):
        tool.parse_requirement(text)


@pytest.mark.parametrize(
    ("version", "clauses", "ok"),
    [
        ("1.84.2", ((">=", "1.84.2"),), True),
        ("1.84.1", ((">=", "1.84.2"),), False),
        ("1.84.10", ((">=", "1.84.2"),), True),  # numeric, not string, order
        ("2.0", ((">=", "2"),), True),  # trailing zeros are equal
        ("2", (("==", "2.0.0"),), True),
        ("5.2.0", ((">=", "1.84.2"), ("<", "6")), True),
        ("6.0.0", ((">=", "1.84.2"), ("<", "6")), False),
        ("5.0.1", (("!=", "5.0.1"),), False),
        ("4.0.0rc1", ((">", "3.9"),), True),
    ],
)
def test_satisfies(version: str, clauses: tuple[tuple[str, str], ...], ok: bool) -> None:
    assert tool.satisfies(version, clauses) is ok


def test_the_project_requirements_are_met_here(capsys: pytest.CaptureFixture[str]) -> None:
    """This Python (the test venv) has the project's dbus-fast: exit 0, its version printed."""
    assert tool.main(["check-python-deps", str(ROOT / "pyproject.toml")]) == 0
    assert capsys.readouterr().out == f"dbus-fast {importlib.metadata.version('dbus-fast')}\n"


def test_missing_module_names_debian_package_and_pip() -> None:
    version, problem = tool.check(tool.parse_requirement("xdg-containers-no-such-module>=1.0"))
    assert version is None
    assert "xdg_containers_no_such_module" in problem and "is missing for" in problem
    assert "apt install python3-xdg-containers-no-such-module" in problem
    assert "pip install 'xdg-containers-no-such-module>=1.0'" in problem
    assert sys.executable in problem


def test_too_old_names_versions_and_packages() -> None:
    have = importlib.metadata.version("dbus-fast")
    version, problem = tool.check(tool.parse_requirement("dbus-fast>=999"))
    assert version is None
    assert f"dbus-fast {have} in {sys.executable} is too old" in problem
    assert "needs dbus-fast>=999" in problem
    assert "apt install python3-dbus-fast" in problem and "pip install 'dbus-fast>=999'" in problem


def test_excluded_release_is_not_called_too_old() -> None:
    _, problem = tool.check(tool.parse_requirement("dbus-fast>=1,<1.1"))
    assert "is not a release it supports" in problem


def test_unreadable_pyproject_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "pyproject.toml"
    bad.write_text('[project]\ndependencies = ["dbus-fast>=1; os_name == \'posix\'"]\n')
    assert tool.main(["check-python-deps", str(bad)]) == 1
    assert "cannot read the dependencies in" in capsys.readouterr().err
