"""Architecture: imports point one way, from the stages down to the mechanisms; nothing imports the CLI.

The import graph is read from the source (ast over every module of the package), so it includes imports
inside functions and under TYPE_CHECKING: a cycle a local import hides is still a cycle. Two levels:
modules (no module may reach itself) and packages (wf_pipeline's first-level folders, top-level modules
standing alone: recipe may not import data while data imports recipe).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "wf_pipeline"

# Imports that point up the layers and close a cycle, tolerated for now: empty since the restructure
# (issue 14). A new cycle must be fixed, not added here.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()

Graph = dict[str, set[str]]


def module_index(root: Path, package: str) -> dict[str, bool]:
    """Every module of `package` under `root`: dotted name -> whether it is a package (__init__.py)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = is_package
    return modules


def _path_of(root: Path, name: str, is_package: bool) -> Path:
    base = root.joinpath(*name.split("."))
    return base / "__init__.py" if is_package else base.with_suffix(".py")


def _owning_module(name: str, modules: dict[str, bool]) -> str | None:
    """The module an imported name lives in: itself if a module, else its longest module prefix."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(root: Path, name: str, modules: dict[str, bool]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its body (functions included)."""
    is_package = modules[name]
    tree = ast.parse(_path_of(root, name, is_package).read_text(encoding="utf-8"))
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # `from pkg import sub` imports the submodule `pkg.sub`; `from mod import name`, the module.
            candidates = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                          for alias in node.names]
        else:
            continue
        for candidate in candidates:
            target = _owning_module(candidate, modules)
            if target is not None and target != name:
                targets.add(target)
    return targets


def import_graph(root: Path, package: str) -> Graph:
    modules = module_index(root, package)
    return {name: imports_of(root, name, modules) for name in modules}


def package_of(module: str, graph: Graph) -> str:
    """wf_pipeline.X for a module inside the first-level folder X; a top-level module is its own package."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and any(m.startswith(module + ".") for m in graph)):
        return ".".join(parts[:2])
    return module


def package_graph(graph: Graph) -> Graph:
    packages: Graph = {package_of(m, graph): set() for m in graph}
    for source, targets in graph.items():
        for target in targets:
            if package_of(source, graph) != package_of(target, graph):
                packages[package_of(source, graph)].add(package_of(target, graph))
    return packages


def without(graph: Graph, edges: set[tuple[str, str]]) -> Graph:
    return {source: {t for t in targets if (source, t) not in edges} for source, targets in graph.items()}


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def reaches(graph: Graph, start: str, goal: str) -> bool:
    seen, todo = {start}, [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target == goal:
                return True
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return False


def _describe(component: list[str], graph: Graph, module_graph: Graph) -> str:
    members = set(component)
    edges = [f"{source} -> {target}" for source in component for target in sorted(graph.get(source, ()))
             if target in members]
    if graph is not module_graph:  # a package cycle: name the module imports behind each package edge
        edges = [f"{s} -> {t}" for s, targets in sorted(module_graph.items()) for t in sorted(targets)
                 if package_of(s, module_graph) in members and package_of(t, module_graph) in members
                 and package_of(s, module_graph) != package_of(t, module_graph)]
    return f"{' <-> '.join(component)}:\n    " + "\n    ".join(edges)


# ---------------------------------------------------------------------------------------------- the package


def test_no_module_imports_the_cli():
    graph = import_graph(ROOT, PACKAGE)
    importers = sorted(m for m, targets in graph.items() if f"{PACKAGE}.cli" in targets)
    assert not importers, f"the CLI only parses arguments and calls the stages; imported by {importers}"


# SparseML compatibility is fenced in its own package; the recipe loader is its one way in.
SPARSEML = f"{PACKAGE}.recipe.sparseml"
SPARSEML_ENTRY = f"{PACKAGE}.recipe.loader"


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_only_the_recipe_loader_imports_the_sparseml_package():
    graph = import_graph(ROOT, PACKAGE)
    importers = sorted(m for m, targets in graph.items() if not _inside(m, SPARSEML)
                       and any(_inside(t, SPARSEML) for t in targets))
    assert importers == [SPARSEML_ENTRY], (
        f"only {SPARSEML_ENTRY} may import {SPARSEML} (SparseML compatibility stays behind the recipe loader); "
        f"imported by {importers}")
    # ... and through the package's public names, not its inner modules
    assert {t for t in graph[SPARSEML_ENTRY] if _inside(t, SPARSEML)} == {SPARSEML}


def test_the_sparseml_package_imports_nothing_of_the_pipeline_above_it():
    """It reads recipes into plain dicts: errors and the parameter catalog are all it needs."""
    graph = import_graph(ROOT, PACKAGE)
    outside = sorted({t for m, targets in graph.items() if _inside(m, SPARSEML)
                      for t in targets if not _inside(t, SPARSEML)})
    assert outside == [f"{PACKAGE}.errors", f"{PACKAGE}.recipe.param_catalog"], outside


def test_no_import_cycles_between_modules():
    graph = without(import_graph(ROOT, PACKAGE), KNOWN_CYCLE_EDGES)
    found = cycles(graph)
    assert not found, "import cycles between modules:\n" + "\n".join(_describe(c, graph, graph) for c in found)


def test_no_import_cycles_between_packages():
    graph = without(import_graph(ROOT, PACKAGE), KNOWN_CYCLE_EDGES)
    packages = package_graph(graph)
    found = cycles(packages)
    assert not found, ("import cycles between packages (make the lower package not import the higher one):\n"
                       + "\n".join(_describe(c, packages, graph) for c in found))


def test_known_cycle_edges_are_still_needed():
    """An allowed upward import that is gone, or no longer closes a cycle, leaves the list."""
    graph = import_graph(ROOT, PACKAGE)
    packages = package_graph(graph)
    stale = [edge for edge in sorted(KNOWN_CYCLE_EDGES)
             if edge[1] not in graph.get(edge[0], set())
             or not reaches(packages, package_of(edge[1], graph), package_of(edge[0], graph))]
    assert not stale, f"remove from KNOWN_CYCLE_EDGES (no longer an upward import closing a cycle): {stale}"


# ---------------------------------------------------------------------------------------------- the walker


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_walker_sees_local_relative_and_type_checking_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from pkg.low.base import Base\n",
        "pkg/low/base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import stage\n",
        "pkg/low/util.py": "def f():\n    from ..high.stage import run\n    return run\n",
        "pkg/high/__init__.py": "",
        "pkg/high/stage.py": "import os\nfrom . import helper\nfrom pkg.low import Base, util\n",
        "pkg/high/helper.py": "import pkg.low.base as b\n",
        "pkg/cli.py": "",
        "pkg/top.py": "from pkg import cli\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.low.base"] == {"pkg.high.stage"}  # under TYPE_CHECKING
    assert graph["pkg.low.util"] == {"pkg.high.stage"}  # inside a function, relative
    assert graph["pkg.high.stage"] == {"pkg.high.helper", "pkg.low", "pkg.low.util"}
    assert graph["pkg.high.helper"] == {"pkg.low.base"}
    assert graph["pkg.top"] == {"pkg.cli"}
    # stage -> helper -> low.base -> stage; stage -> low (its __init__) -> low.base; stage -> low.util -> stage
    assert cycles(graph) == [["pkg.high.helper", "pkg.high.stage", "pkg.low", "pkg.low.base", "pkg.low.util"]]
    assert cycles(package_graph(graph)) == [["pkg.high", "pkg.low"]]
    upward = {("pkg.low.base", "pkg.high.stage"), ("pkg.low.util", "pkg.high.stage")}
    assert cycles(without(graph, upward)) == [] and cycles(package_graph(without(graph, upward))) == []


# ---------------------------------------------------------------------------------------------- the README


def test_readme_architecture_table_lists_exactly_the_packages_and_top_level_modules():
    """The README's architecture section names every first-level folder and top-level module, and no other."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- architecture:begin -->", "<!-- architecture:end -->"
    assert begin in readme and end in readme, f"README.md lost its {begin} ... {end} markers"
    section = readme.split(begin, 1)[1].split(end, 1)[0]
    listed = re.findall(r"^\| `([\w.]+/?)` \|", section, flags=re.M)
    root = ROOT / PACKAGE
    packages = sorted(f"{p.name}/" for p in root.iterdir() if (p / "__init__.py").is_file())
    modules = sorted(p.name for p in root.glob("*.py") if p.name != "__init__.py")
    assert sorted(n for n in listed if n.endswith("/")) == packages
    assert sorted(n for n in listed if n.endswith(".py")) == modules
    assert len(listed) == len(set(listed)), "a row appears twice"
