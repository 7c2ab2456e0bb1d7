"""The package's shape: no module over 400 lines, no class over 150 lines, no import cycle (lazy imports inside
functions included), and floors that never reach up: the bottom floor (FLOOR: files on disk, names, records)
imports nothing else of the package, and `a2v_flower/models/` imports only itself and the bottom floor (so never
`data/`, the config or the Flower wiring). Read from the source with `ast`, so a change that breaks one of these
fails here, not in a later review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "a2v_flower"
# the bottom floor: what is on disk (checkpoints, caches, where conf/ lies), names, tensors <-> Flower records
FLOOR = {"a2v_flower.checkpoints", "a2v_flower.cache", "a2v_flower.names", "a2v_flower.records", "a2v_flower.resources"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The package's modules that `path` imports anywhere in its source (`from a.b import c` counts a.b.c when
    c is a module, else a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "a2v_flower":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that starts and ends on the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_modules_and_classes_stay_small():
    long_modules = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert {n: k for n, k in long_modules.items() if k > 400} == {}
    long_classes = {f"{n}.{node.name}": node.end_lineno - node.lineno + 1
                    for n, p in MODULES.items() for node in ast.walk(ast.parse(p.read_text()))
                    if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 150}
    assert long_classes == {}


def test_models_never_import_data_and_no_import_cycle():
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    assert {"a2v_flower.records", "a2v_flower.models.generators.stats"} <= graph["a2v_flower.server_generators"]
    upward = {n: sorted(d for d in deps if d.startswith("a2v_flower.data"))
              for n, deps in graph.items() if n.startswith("a2v_flower.models")}
    assert {n: d for n, d in upward.items() if d} == {}
    assert _cycle(graph) is None


def _reaching_up(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Imports that reach up a floor: from FLOOR to anything outside it, from models/ to anything but models/
    and FLOOR. {module: the modules above it that it imports}."""
    def allowed(name: str) -> set[str] | None:
        if name in FLOOR:
            return FLOOR
        return FLOOR | {n for n in graph if n.startswith("a2v_flower.models")} if name.startswith(
            "a2v_flower.models") else None

    found = {n: sorted(d for d in deps if d not in ok) for n, deps in graph.items() if (ok := allowed(n)) is not None}
    return {n: d for n, d in found.items() if d}


def test_lower_floors_never_reach_up():
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    assert FLOOR <= set(graph)  # a renamed floor module must be renamed here too
    assert _reaching_up(graph) == {}


def test_the_floor_check_finds_an_upward_import():
    """The check above can fail: checkpoints importing models/ (as it once did), a model importing the config."""
    graph = {"a2v_flower.checkpoints": {"a2v_flower.names", "a2v_flower.models.generators.keys"},
             "a2v_flower.names": set(), "a2v_flower.models.generators.keys": {"a2v_flower.names"},
             "a2v_flower.models.adapters": {"a2v_flower.config", "a2v_flower.cache"}, "a2v_flower.config": set()}
    assert _reaching_up(graph) == {"a2v_flower.checkpoints": ["a2v_flower.models.generators.keys"],
                                   "a2v_flower.models.adapters": ["a2v_flower.config"]}


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b", "c"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    """The check above can fail: it finds a planted cycle and stays quiet on an acyclic graph."""
    assert _cycle(graph) == cycle
