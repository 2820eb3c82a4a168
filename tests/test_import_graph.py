"""No import cycles among the project's modules: every import counts, the lazy ones inside functions included (a
lazy import hides a cycle from the interpreter, not from a reader)."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("services", "node_server", "infra")


def project_modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """Dotted module name → file, for every module of the project's packages."""
    files = [path for package in PACKAGES for path in (root / package).rglob("*.py")]
    return {".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
            for path in files}


def _target(name: str, modules: dict) -> str | None:
    """The project module an import of ``name`` loads: itself, or the nearest package above it that exists."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, source: str, modules: dict, *, is_package: bool = False) -> set[str]:
    """The project modules ``module`` imports anywhere in ``source`` (module level, functions, TYPE_CHECKING)."""
    found = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from package import module`` loads the module; ``from module import name`` loads the module.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(target for target in map(lambda name: _target(name, modules), names) if target)
    found.discard(module)
    return found


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(name, path.read_text(), modules, is_package=path.name == "__init__.py")
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = counter[0]
                    counter[0] += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def test_no_import_cycle_among_the_project_modules():
    graph = import_graph()
    assert len(graph) > 100, "the module scan found too few modules"
    assert cycles(graph) == []


def test_the_scan_sees_lazy_relative_and_package_imports():
    modules = {"pkg": None, "pkg.a": None, "pkg.b": None, "pkg.sub": None, "pkg.sub.c": None}
    source = "from . import b\ndef f():\n    from .sub.c import thing\n    import pkg.sub\n"
    assert imports_of("pkg.a", source, modules) == {"pkg.b", "pkg.sub.c", "pkg.sub"}
    assert imports_of("pkg.sub", "from .c import x\nfrom .. import a\n", modules, is_package=True) == {
        "pkg.sub.c", "pkg.a"}


def test_a_cycle_through_a_lazy_import_is_found():
    modules = {"m.a": None, "m.b": None, "m.c": None, "m": None}
    graph = {"m.a": imports_of("m.a", "from m.b import X\n", modules),
             "m.b": imports_of("m.b", "def late():\n    from m.c import Y\n", modules),
             "m.c": imports_of("m.c", "import m.a\n", modules),
             "m": set()}
    assert cycles(graph) == [{"m.a", "m.b", "m.c"}]
    graph["m.c"] = set()
    assert cycles(graph) == []
