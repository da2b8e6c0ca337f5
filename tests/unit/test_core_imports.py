"""The session core stays sans I/O, and the session no longer imports its server.

Imports are read from the source (TYPE_CHECKING blocks included), so a module the
core imports only for type hints counts too.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import xdg_containers

ROOT = Path(xdg_containers.__file__).parent
#: What a sans-I/O core must not reach, directly or through another module of ours.
IO_MODULES = frozenset({"asyncio", "socket", "selectors", "ssl", "subprocess", "threading"})


def _module_file(name: str) -> Path | None:
    rel = Path(*name.split(".")[1:])
    for candidate in (ROOT / rel / "__init__.py", ROOT / rel.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


@cache
def imports_of(name: str) -> frozenset[str]:
    """Every module ``name`` (a module of xdg_containers) imports, absolute names."""
    path = _module_file(name)
    assert path is not None, name
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            found.add(base)
            for alias in node.names:
                # "from . import x" / "from .pkg import module"
                if _module_file(f"{base}.{alias.name}") is not None and base.startswith(
                    "xdg_containers"
                ):
                    found.add(f"{base}.{alias.name}")
    return frozenset(found)


def reachable(start: str) -> dict[str, str]:
    """Every module reachable from ``start`` by imports -> the module importing it."""
    seen: dict[str, str] = {start: ""}
    todo = [start]
    while todo:
        mod = todo.pop()
        if not mod.startswith("xdg_containers"):
            continue
        for dep in imports_of(mod):
            if dep not in seen:
                seen[dep] = mod
                todo.append(dep)
    return seen


def core_modules() -> list[str]:
    """Every module of the core package."""
    return sorted(
        "xdg_containers.core" + ("" if p.stem == "__init__" else f".{p.stem}")
        for p in (ROOT / "core").glob("*.py")
    )


def test_the_core_reaches_no_io_module() -> None:
    assert len(core_modules()) > 5
    for mod in core_modules():
        seen = reachable(mod)
        bad = {m.split(".")[0] for m in seen} & IO_MODULES
        chains = []
        for b in sorted(bad):
            chain, at = [], next(m for m in seen if m.split(".")[0] == b)
            while at:
                chain.append(at)
                at = seen[at]
            chains.append(" <- ".join(chain))
        assert not bad, f"{mod} reaches {sorted(bad)}: {chains}"


def test_the_core_imports_no_driver_and_no_server() -> None:
    for mod in core_modules():
        outside = [
            m for m in reachable(mod)
            if m.startswith(("xdg_containers.proxy", "xdg_containers.servers"))
        ]
        assert not outside, f"{mod} reaches {outside}"


def test_no_cycle_between_session_server_and_registry() -> None:
    for mod in ("xdg_containers.servers.server", "xdg_containers.servers.registry"):
        for dep in reachable(mod):
            if dep.startswith("xdg_containers."):
                assert mod not in reachable(dep) or dep == mod, f"{mod} <-> {dep}"


def test_the_checker_sees_imports_under_type_checking() -> None:
    # (The check above must not pass because it missed what it looks for.)
    assert "xdg_containers.servers.server" in reachable("xdg_containers.servers.registry")
    assert "asyncio" in reachable("xdg_containers.proxy.session")
