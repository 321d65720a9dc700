"""The import graph of the project, read with `ast` (nothing is imported): no cycle among the project's modules,
`ibot_kernels` never imports `ibot_engine`, no subpackage of the engine reaches back up to a top-level module that
imports it, only the installed names are imported, and lightly's example is built in one place. Every import counts,
also one inside a function or under `TYPE_CHECKING`, so that an import moved into a function does not hide a cycle.

The folders are `engine/`, `kernels/` and `benchmarks/`; they install as `ibot_engine`, `ibot_kernels` and
`ibot_benchmarks` (pyproject.toml's `package-dir`), the names every import uses."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"engine": "ibot_engine", "kernels": "ibot_kernels", "benchmarks": "ibot_benchmarks"}  # folder -> import
SOURCES = ("engine", "kernels", "benchmarks", "tests", "launch")  # every folder of Python files


def module_files() -> dict[str, Path]:
    """Dotted import name -> file, for every module of the packages (a package is its __init__.py)."""
    modules = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [name, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imported_names(path: Path, package: str = "") -> list[str]:
    """Every module name imported by the file at `path` (`from a.b import c` gives a.b and a.b.c); relative imports
    are resolved against `package`."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from a.b import c` counts a.b.c when that is a module, else a.b)."""
    modules = module_files()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target in imported_names(path, package):
            while target and target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]], root: str = "ibot_engine") -> list[str]:
    """Imports that run back up: a module of a subpackage `root.sub` imports a top-level module `root.top` (a file
    directly under the package, not a subpackage) that itself imports `root.sub`. Not a cycle of modules, but the
    subpackage then depends on a module above it that depends on the subpackage, so neither can move or be read
    alone. Returned as 'sub.module -> root.top -> sub.other' strings."""
    subpackages = {name for name in graph if name.count(".") == 1 and name.startswith(f"{root}.")
                   and any(other.startswith(f"{name}.") for other in graph)}
    top_level = {name for name in graph if name.count(".") == 1 and name.startswith(f"{root}.")} - subpackages

    def subpackage_of(name: str) -> str | None:
        return next((sub for sub in subpackages if name == sub or name.startswith(f"{sub}.")), None)

    found = []
    for name, targets in sorted(graph.items()):
        sub = subpackage_of(name)
        if sub is None:
            continue
        for top in sorted(targets & top_level):
            back = sorted(t for t in graph[top] if subpackage_of(t) == sub)
            if back:
                found.append(f"{name} -> {top} -> {', '.join(back)}")
    return found


def test_the_graph_covers_the_packages():
    graph = import_graph()
    assert "ibot_engine.train.loop" in graph and "ibot_kernels.dispatch" in graph
    assert "ibot_engine.train.trainer" in graph["ibot_engine.train.loop"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_never_import_engine():
    offenders = {name: sorted(t for t in targets if t.split(".")[0] == "ibot_engine")
                 for name, targets in import_graph().items() if name.split(".")[0] == "ibot_kernels"}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_subpackage_imports_back_up_through_the_top_level():
    found = upward_imports(import_graph())
    assert not found, "upward imports: " + "; ".join(found)


def test_upward_imports_finds_one():
    """The shape of the old `engine/accel.py` (model/ibot.py -> accel -> model/vit.py) is found, and a top-level module
    that the subpackage uses without importing it back is not."""
    graph = {"ibot_engine.model": set(), "ibot_engine.model.ibot": {"ibot_engine.accel", "ibot_engine.config"},
             "ibot_engine.model.vit": set(), "ibot_engine.accel": {"ibot_engine.model.vit"},
             "ibot_engine.config": set()}
    assert upward_imports(graph) == ["ibot_engine.model.ibot -> ibot_engine.accel -> ibot_engine.model.vit"]
    graph["ibot_engine.accel"] = set()
    assert upward_imports(graph) == []


def test_only_installed_names_are_imported():
    """No source file imports a folder name (`engine`, `kernels`, `benchmarks`) as a module: those resolve only from
    the repository root, and would load a second copy of a module beside its `ibot_*` one."""
    offenders = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            bad = [n for n in imported_names(path) if n.split(".")[0] in PACKAGES]
            if bad:
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(set(bad))}")
    assert not offenders, offenders


# Folder names as modules in text: `import engine` in a code string, `python -m engine`, a ["-m", "engine"] argv.
FOLDER_AS_MODULE = re.compile(r'(\bimport\s+([\w.]+\s*,\s*)*|\bfrom\s+|-m\s+)(engine|kernels|benchmarks)(?![\w/])'
                              r'|"-m",\s*"(engine|kernels|benchmarks)"')


def test_no_text_runs_a_folder_name_as_a_module():
    """The same in code strings, shell scripts, configs and docs (not the checked-in results, which record the
    commands as they ran). tests/test_install.py imports Hugging Face's `kernels` on purpose."""
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / ".ci").iterdir()]
    files += [p for folder in SOURCES for p in (ROOT / folder).rglob("*")
              if p.suffix in (".py", ".sh", ".sbatch", ".yaml", ".md") and "results" not in p.parts]
    skip = {ROOT / "tests" / "test_install.py", Path(__file__).resolve()}
    offenders = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in sorted(set(files)) if p not in skip
                 for n, line in enumerate(p.read_text().splitlines(), 1) if FOLDER_AS_MODULE.search(line)]
    assert not offenders, offenders
    assert FOLDER_AS_MODULE.search('cmd = [sys.executable, "-m", "engine", "train"]')
    assert FOLDER_AS_MODULE.search("torchrun --nproc_per_node=8 -m engine train")
    assert FOLDER_AS_MODULE.search('"import pkgutil, importlib, sys, engine, kernels\\n"')
    assert not FOLDER_AS_MODULE.search("python -m ibot_engine train  # args from engine/cli.py")


def test_one_module_builds_lightlys_example():
    """lightly is imported by one module of the engine and benchmarks (the one that builds lightly's iBOT example,
    which both the speed peer and the learning peer use), and tests import nothing from the benchmarks."""
    lightly_users = sorted(str(path.relative_to(ROOT)) for folder in ("engine", "benchmarks")
                           for path in (ROOT / folder).rglob("*.py")
                           if any(n.split(".")[0] == "lightly" for n in imported_names(path)))
    assert len(lightly_users) == 1, lightly_users
    from_benchmarks = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("*.py")
                             if any(n.split(".")[0] == "ibot_benchmarks" for n in imported_names(path)))
    assert not from_benchmarks, from_benchmarks
