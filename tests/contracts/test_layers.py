"""The package's dependencies point down (DESIGN.md): an AST scan of every first-party import.

- each package or module imports only from the layers listed for it in :data:`ALLOWED`
  (data never imports tasks, quant never the runner, reporting never training...);
- no first-party import hides inside a function, except deliberate start-up-cost ones in entry
  points, marked with a ``# start-up:`` comment saying why;
- no module imports a private (``_name``) from another module.
"""
from __future__ import annotations

import ast
import typing as tp
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "diffq_bench").rglob("*.py")) + sorted((ROOT / "hydra_plugins").rglob("*.py"))

#: layer -> the first-party layers it may import (itself included where listed)
ALLOWED: tp.Dict[str, tp.Set[str]] = {
    "checks": set(),
    "io": {"checks"},
    "models": {"checks", "models"},
    "data": {"checks", "data", "io", "models"},
    "quant": {"checks", "quant", "io", "distributed"},
    "tasks": {"checks", "tasks", "data", "models", "io"},
    "optim": {"checks"},
    "init": {"checks", "io"},
    "config": {"checks", "quant", "tasks", "optim", "data", "init"},
    "xp": {"checks", "io", "config", "init"},
    "checkpoint": {"checks", "io"},
    "distributed": set(),
    "ema": {"checks"},
    "train": {"checks", "checkpoint", "io", "optim", "quant", "tasks", "xp", "distributed", "data", "init",
              "ema"},
    "finish": {"checks", "train", "checkpoint", "io", "quant", "tasks", "xp", "distributed"},
    "launch": {"checks", "launch", "xp", "config", "io", "tasks", "init"},
    "results": {"checks", "results", "quant", "xp", "io"},
    "cli": {"checks", "io", "config", "data", "checkpoint", "train", "finish", "launch", "results", "tasks",
            "xp", "quant", "optim", "distributed", "init"},
    "__init__": {"checks"},
    "hydra_plugins": {"checks", "hydra_plugins", "launch", "xp", "io", "config", "train", "results"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "hydra_plugins":
        return "hydra_plugins"
    return rel.parts[1].removesuffix(".py")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = _module(path).split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _first_party(path: Path) -> tp.Iterator[tp.Tuple[ast.AST, str, tp.List[str]]]:
    """(node, imported module, imported names) of every first-party import in ``path``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(path, node)
            if target.startswith(("diffq_bench", "hydra_plugins.diffq_bench")):
                yield node, target, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("diffq_bench"):
                    yield node, alias.name, []


def _target_layers(target: str, names: tp.Sequence[str]) -> tp.List[str]:
    parts = target.split(".")
    if parts[0] == "hydra_plugins":
        return ["hydra_plugins"]
    if len(parts) == 1:  # from diffq_bench import io, train...
        return list(names)
    return [parts[1]]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dependencies_point_down(path):
    layer = _layer(path)
    allowed = ALLOWED[layer] | {layer}
    for node, target, names in _first_party(path):
        for dep in _target_layers(target, names):
            assert dep in allowed, (f"{path.relative_to(ROOT)}:{node.lineno} ({layer}) imports {target} "
                                    f"({dep}); {layer} may import only {sorted(allowed)}")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_hidden_first_party_imports(path):
    lines = path.read_text().splitlines()
    first_party = {node.lineno for node, _, _ in _first_party(path)}
    for func in ast.walk(ast.parse(path.read_text())):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno in first_party:
                above = lines[node.lineno - 2] if node.lineno >= 2 else ""
                assert "# start-up:" in above, (
                    f"{path.relative_to(ROOT)}:{node.lineno}: first-party import inside {func.name}(); "
                    "import at the top of the module (or mark a deliberate start-up-cost import "
                    "with a '# start-up: <reason>' comment on the line above)")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_imported_across_modules(path):
    for node, target, names in _first_party(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path.relative_to(ROOT)}:{node.lineno} imports private {private} from {target}"


def test_the_scan_sees_the_layers():
    layers = {_layer(p) for p in SOURCES}
    assert layers <= set(ALLOWED), f"modules in no layer: {layers - set(ALLOWED)}"
    assert {"data", "quant", "tasks", "results", "launch", "train"} <= layers
