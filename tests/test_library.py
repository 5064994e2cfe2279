"""The library's imports, read from its source (every `import` and `from` statement, module level and inside
functions): it imports nothing of this repository but itself (not the stage programs, the developer tools or the
tests), and its modules import one another without cycles."""

from __future__ import annotations

import ast
from pathlib import Path

from support.common import REPO, SCRIPTS

LIBRARY = SCRIPTS / "hpc_finetune"


def module_name(path: Path) -> str:
    parts = path.relative_to(SCRIPTS).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(LIBRARY.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(dotted name, at module level, line) of every import in a file; `from a import b` gives a and a.b. Relative
    imports are resolved; imports under `if TYPE_CHECKING:` never run and are left out."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            top_level = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((alias.name, top_level, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - child.level + 1] if child.level else []
                module = ".".join([*base, *([child.module] if child.module else [])])
                found.append((module, top_level, child.lineno))
                found.extend((f"{module}.{alias.name}", top_level, child.lineno) for alias in child.names)
            visit(child, top_level)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def repository_modules() -> set[str]:
    """Top-level names this repository makes importable besides the library: the stage programs and the tools
    (scripts/ is first on sys.path when a stage runs), the tests and their helpers."""
    names = set()
    for root in (SCRIPTS, REPO / "tests"):
        for entry in root.iterdir():
            if entry.suffix == ".py" or (entry.is_dir() and not entry.name.startswith((".", "__"))):
                names.add(entry.stem)
    return names - {"hpc_finetune"}


def test_the_library_imports_itself_the_standard_library_and_third_party_packages_only():
    ours = repository_modules()
    assert {"train", "tools", "support"} <= ours  # what the check looks for is there
    wrong = [f"{path.relative_to(REPO)}:{line} imports {name}" for path in MODULES.values()
             for name, _, line in imports(path)
             if name.split(".")[0] in ours]
    assert not wrong, "the library may not import the stage programs, the tools or the tests:\n" + "\n".join(wrong)


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    """Library module -> the library modules it imports (the longest importable prefix of each imported name)."""
    def target(name: str) -> str | None:
        parts = name.split(".")
        return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in MODULES), None)

    return {name: {t for imported, top, _ in imports(path) if top or not module_level_only
                   if (t := target(imported)) not in (None, name)}
            for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_cycle_finder_finds_a_cycle_and_only_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_at_module_level():
    """A module-level cycle breaks whichever module of it is imported first (a half-initialised module)."""
    assert len(MODULES) > 50 and import_graph(True)["hpc_finetune.train.run"]  # the graph is read
    assert cycles(import_graph(True)) == []


def test_no_import_cycle_even_through_imports_inside_functions():
    """An import inside a function that closes a cycle hides it rather than breaking it: the modules still
    depend on each other (the train stage's control -> run -> setup -> control was one)."""
    assert cycles(import_graph(False)) == []
