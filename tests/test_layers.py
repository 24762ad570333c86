"""The two layers and their imports, read from the source (AST, no import executed):

* nothing under ``ptqpasses/`` imports ``backends`` or ``tools``, at module level or inside a
  function (../shared/DESIGN.md's one rule);
* no module-level import circle among the project's modules (``ptqpasses``, ``backends``,
  ``tools``): a circle means one of its files holds a piece that belongs in a module of its
  own.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Repository folder -> the import name it installs as (pyproject's package-dir).
FOLDERS = {"ptqpasses": "ptqpasses", "backends": "ptqpasses_backends", "tools": "ptqpasses_tools"}
PACKAGES = tuple(FOLDERS.values())
#: The folder names the code must not import by (only installed, they would clash).
BARE = ("backends", "tools")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """Project modules imported by ``path`` (``from a.b import c`` counts as ``a.b`` and, if
    ``a.b.c`` is a module, as ``a.b.c``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES + BARE}


def test_ptqpasses_never_imports_backends_or_tools():
    offenders = []
    for module, path in _modules().items():
        if module.split(".")[0] != "ptqpasses":
            continue
        bad = {name for name in _imports(path, module, top_level_only=False)
               if name.split(".")[0] in ("ptqpasses_backends", "ptqpasses_tools", *BARE)}
        if bad:
            offenders.append(f"{path.relative_to(ROOT)}: {sorted(bad)}")
    assert not offenders, "ptqpasses/ must not import backends/ or tools/:\n" + "\n".join(
        offenders)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        deps = set()
        for name in _imports(path, module, top_level_only=True):
            # a package import also runs the package's __init__ (its parents' too)
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                deps.add(name)
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_package_edge(a: str, b: str) -> bool:
    """``pkg/__init__.py`` importing its own submodule (and the submodule importing a sibling
    through the package) is how a package re-exports: not a design circle."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_module_level_import_circles():
    graph = _graph()
    # drop the edges between a package and its own submodules (re-exports)
    pruned = {a: {b for b in deps if not _is_package_edge(a, b)} for a, deps in graph.items()}
    cycles = _cycles(pruned)
    assert not cycles, "module-level import circles: " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_the_checks_see_the_imports():
    """Guards the guard: the AST walk finds an import inside a function and a circle."""
    graph = _graph()
    assert "ptqpasses_backends.tvm.registry" in graph["ptqpasses_backends.tvm.compile"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_installed_names_cannot_clash():
    """pyproject installs every package folder under an unambiguous name (no top-level
    ``tools`` or ``backends`` in site-packages), and the code imports them only by those names."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {name: folder for folder, name in FOLDERS.items()}
    packages = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert set(config["packages"]) == packages, "pyproject's package list is not the folders'"
    assert not {p.split(".")[0] for p in config["packages"]} & set(BARE)
    bare = [f"{path.relative_to(ROOT)}: {sorted(bad)}" for module, path in _modules().items()
            if (bad := {n for n in _imports(path, module, top_level_only=False)
                        if n.split(".")[0] in BARE})]
    assert not bare, "imports by the repository folder name, not the installed one:\n" + \
        "\n".join(bare)
