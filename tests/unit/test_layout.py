"""The package's layout as docs/design.md draws it: rooms, what each may import, sizes.

Read from the source (every import statement, those under TYPE_CHECKING and inside
functions included), so a new import that runs back up a floor or closes a loop fails
here, naming the files, before it makes the code harder to change.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "xdg_containers"

_BELOW_IO = {"wire", "sasl", "policy", "config", "core", "compat", "anchor"}
#: Room -> the rooms it may import (its own always). The order of docs/design.md.
ALLOWED: dict[str, set[str]] = {
    "wire": set(),
    "sasl": {"wire"},
    "policy": {"wire"},
    "config": {"wire"},
    "compat": set(),
    "anchor": {"wire"},
    "core": {"wire", "sasl", "policy", "config"},
    "io": _BELOW_IO,
    "servers": _BELOW_IO | {"io"},
    "service": _BELOW_IO | {"io", "servers"},
    "app": _BELOW_IO | {"io", "servers", "service"},
    "cli": _BELOW_IO | {"io", "servers", "service", "app"},
    "__main__": {"cli"},
    "__init__": set(),
}
#: Top-level modules allowed besides the rooms (packages).
LOOSE = {"__init__", "__main__", "config"}
MAX_LINES = 450


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every module of ours that ``name`` imports, wherever the statement stands."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = full if full in known else base
                if target in known and target != name:
                    yield target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known and alias.name != name:
                    yield alias.name


def graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports."""
    known = modules()
    return {name: set(imports(name, path, known)) for name, path in known.items()}


def room(name: str) -> str:
    """The room of a dotted module name: its first component under the package."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_is_in_a_room_of_the_design() -> None:
    loose = {room(n) for n, p in modules().items() if p.parent == PACKAGE} - {
        room(n) for n, p in modules().items() if p.parent != PACKAGE
    }
    assert loose <= LOOSE, f"loose top-level modules {sorted(loose - LOOSE)}: give them a room"
    assert {room(n) for n in modules()} <= set(ALLOWED)


def upward(edges: dict[str, set[str]]) -> list[str]:
    """The imports that run against the rooms' order."""
    return [
        f"{a} imports {b}"
        for a, targets in edges.items()
        for b in sorted(targets)
        if room(a) != room(b) and room(b) not in ALLOWED[room(a)]
    ]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The loops of the import graph (each found once, as a path back to its start)."""
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])
    return found


def test_no_room_imports_one_above_it() -> None:
    wrong = upward(graph())
    assert not wrong, "imports that run against docs/design.md's rooms:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    loops = cycles(graph())
    assert not loops, "import cycles:\n" + "\n".join(" -> ".join(c) for c in loops)


def test_the_checks_see_an_upward_import_and_a_cycle() -> None:
    """The checks can fail: the real graph plus one made-up edge trips each."""
    edges = graph()
    edges["xdg_containers.wire.header"] = {"xdg_containers.io.session"}
    assert upward(edges) == ["xdg_containers.wire.header imports xdg_containers.io.session"]
    assert any("xdg_containers.wire.header" in loop for loop in cycles(edges))


def test_no_module_over_the_size_a_reader_takes_in() -> None:
    big = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"
