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
FLOOR = {"a2v_flower.checkpoints", "a2v_flower.cache", "a2v_flower.names", "a2v_flower.records", "a2v_flower.resources",
         "a2v_flower.rules", "a2v_flower.schema", "a2v_flower.generator_schema"}  # the schema: the specs code takes


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
    assert {"a2v_flower.records", "a2v_flower.models.generators.from_statistics"} <= graph["a2v_flower.server_generators"]
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


# ---- one way from YAML to code ----------------------------------------------------------------------------------

# Modules that may touch the untyped config tree (omegaconf): the config module and the schema it types the tree
# with, the docs generator that reads the YAML, and Hydra's two entry points, which hand Hydra's tree on at once
# (run.launch to config.for_job) or read only Hydra's own keys (the sweep callback's hydra.sweep.dir).
UNTYPED = {"a2v_flower.config", "a2v_flower.schema", "a2v_flower.generator_schema", "a2v_flower.docs_config",
           "a2v_flower.run", "a2v_flower.sweeps"}


def _names(path: Path) -> set[str]:
    """Every variable, parameter and attribute-base name of `path`'s source."""
    tree = ast.parse(path.read_text())
    return ({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            | {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)})


def _imports_omegaconf(path: Path) -> bool:
    return any(isinstance(n, (ast.Import, ast.ImportFrom))
               and any((getattr(n, "module", None) or a.name).split(".")[0] == "omegaconf" for a in n.names)
               for n in ast.walk(ast.parse(path.read_text())))


def test_only_the_config_module_reads_the_untyped_config():
    """Code takes typed specs (`conf.train` is a TrainSpec): no `cfg` tree outside the config module, and omegaconf
    only where UNTYPED says why."""
    assert {n for n, p in MODULES.items() if n != "a2v_flower.config" and "cfg" in _names(p)} == set()
    assert {n for n, p in MODULES.items() if _imports_omegaconf(p)} <= UNTYPED


def _yaml_keys() -> set[str]:
    """Dotted keys conf/config.yaml and every option of its groups set."""
    import yaml

    from a2v_flower.resources import CONF_DIR

    top = yaml.safe_load((CONF_DIR / "config.yaml").read_text())
    keys: set[str] = set()

    def walk(node, prefix: str):
        for k, v in node.items():
            if isinstance(v, dict) and v and k not in ("splits", "tiny"):  # flow mappings are one value
                walk(v, f"{prefix}{k}.")
            else:
                keys.add(prefix + k)

    top.pop("defaults")
    for option in CONF_DIR.glob("*/*.yaml"):
        if option.parent.name != "experiment":  # experiments set keys of other nodes (`# @package _global_`)
            walk(yaml.safe_load(option.read_text()) or {}, f"{option.parent.name}.")
    top.pop("hydra", None)
    walk(top, "")
    return keys


def _schema_defaults(cls, prefix: str = "") -> set[str]:
    """Dotted keys whose schema field carries a default of its own (MISSING is none)."""
    import dataclasses
    import typing

    from omegaconf import MISSING

    out, hints = set(), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out |= _schema_defaults(kind, f"{prefix}{f.name}.")
        elif f.default is None:  # None is "not given" (a key of another option, or null), not a second value
            continue
        elif (f.default is not dataclasses.MISSING and f.default is not MISSING) or \
                f.default_factory is not dataclasses.MISSING:
            out.add(prefix + f.name)
    return out


def test_every_value_has_one_default():
    """A key the YAML sets has no default in the schema too (the dataclasses are the specs the code takes; tests
    and benchmarks build them from the YAML with config.spec). A saved run's config predating a key takes today's
    YAML value (config.load_run), or the value it ran with (config.ABSENT_THEN)."""
    from a2v_flower.schema import Config

    twice = _schema_defaults(Config) & _yaml_keys()
    assert twice == set()
