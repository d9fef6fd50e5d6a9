"""The shape of the code base, read from the source with ``ast`` (nothing is imported):

* no import cycle among the project's modules (``unpg``, ``unpg.loaders`` = ``loaders/``,
  ``unpg.kernels`` = ``kernels/``);
* ``kernels/`` imports nothing from the rest of ``unpg`` (it is the bottom layer);
* imports sit at the top of a module; only optional dependencies (and project modules that
  wrap one) are imported inside functions, so the dependency graph a reader or tool sees is
  the real one;
* no source file outside ``tests/`` is over 450 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> import name (setup.py's package_dir mapping).
PACKAGES = {"unpg": "unpg", "loaders": "unpg.loaders", "kernels": "unpg.kernels"}
MAX_LINES = 450
# Imported inside the branch that needs them: heavy or optional at run time.
OPTIONAL = (
    "triton", "nvidia", "numba", "matplotlib", "onnx", "onnxruntime", "simplejpeg", "turbojpeg",
    "torchvision", "PIL", "cut_cross_entropy", "liger_kernel", "torch.utils.tensorboard",
)


def _optional(name: str) -> bool:
    return any(name == o or name.startswith(o + ".") for o in OPTIONAL)


def _modules() -> Dict[str, Path]:
    """Dotted module name -> file, for every project module."""
    out: Dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [] if rel.parts == ("__init__",) else list(rel.parts)
            if parts and parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package] + parts)
            if folder == "unpg" and parts and parts[0] in ("loaders", "kernels"):
                continue  # not a real folder of unpg/, but guard against a clash
            out[name] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """Absolute dotted name of a ``from X import`` (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(path):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: Set[str]) -> Iterator[Tuple[str, int, bool]]:
    """``(imported project module, line, at module level)`` for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    top_level = {id(n) for n in tree.body}
    # Imports under `if TYPE_CHECKING:` / try at top level also count as top level.
    for stmt in tree.body:
        if isinstance(stmt, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                # `from pkg import submodule` depends on the submodule, else on pkg itself.
                yield (sub if sub in known else target), node.lineno, id(node) in top_level


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    known = set(mods)
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _, _ in _imports(name, path, known):
            while target and target not in known:  # unpg.kernels.x.y -> unpg.kernels.x
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        item = stack.pop()
                        on_stack.discard(item)
                        component.append(item)
                        if item == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_module_map_covers_the_three_folders():
    mods = _modules()
    for name in ("unpg.trainer", "unpg.loaders", "unpg.kernels", "unpg.eval.metrics"):
        assert name in mods, name
    assert all(not n.startswith("unpg.unpg") for n in mods)


def test_no_import_cycle_among_project_modules():
    assert _cycles(_graph()) == []


def test_kernels_import_nothing_from_the_rest_of_unpg():
    graph = _graph()
    bad = {m: sorted(t for t in deps if not t.startswith("unpg.kernels"))
           for m, deps in graph.items() if m.startswith("unpg.kernels")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_project_imports_sit_at_module_level():
    mods = _modules()
    known = set(mods)
    # A project module that imports an optional dependency at its top is optional itself
    # (e.g. the DALI loader, the Triton launchers): importing it lazily is the point.
    wraps_optional = {name for name, path in mods.items()
                      if any(top and _optional(t) for t, _, top in _imports(name, path, known))}
    late = []
    for name, path in mods.items():
        for target, line, top in _imports(name, path, known):
            if not top and not _optional(target) and target not in wraps_optional:
                late.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert late == [], "imports inside functions (only optional dependencies may be):\n" + \
        "\n".join(late)


@pytest.mark.parametrize("folder", ["unpg", "loaders", "kernels", "bench"])
def test_no_source_file_over_450_lines(folder):
    long = {str(p.relative_to(REPO)): n for p in sorted((REPO / folder).rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"split these by responsibility (limit {MAX_LINES} lines): {long}"
