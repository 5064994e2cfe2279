"""What a program's behaviour depends on in this project: the program and every project module it imports,
transitively, found by reading the imports (anywhere in a file: the heavy imports inside functions count too).
The workflow makes these files the inputs of the program's rule, so editing a module re-runs exactly the stages
that use it; the train stage hashes them into its checkpoint fingerprint, so code that trains differently never
resumes or reuses a checkpoint of the old code.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

PACKAGE = "hpc_finetune"
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # scripts/: the package and the stage programs


# `from hpc_finetune.x import (a, b)` or `import hpc_finetune.x`, at any indentation (imports inside functions
# count). A plain scan, not ast: it runs for every rule at every Snakemake start, and a mention in a docstring
# only adds a file.
_FROM = re.compile(rf"^[ \t]*from[ \t]+({PACKAGE}(?:\.\w+)*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]*)", re.M)
_IMPORT = re.compile(rf"^[ \t]*import[ \t]+({PACKAGE}(?:\.\w+)*)", re.M)
# A program a module runs in a subprocess, named next to it (`Path(__file__)...with_name("engine.py")`: vLLM's
# engine driver, run by another interpreter): not imported, but the stage's behaviour depends on it just the same.
_RUNS = re.compile(r"""with_name\(\s*["'](\w+\.py)["']\s*\)""")


@functools.cache
def _source(path: Path) -> str:
    return path.read_text()


@functools.cache
def _imports(path: Path) -> tuple[str, ...]:
    """Dotted names of the project modules a file imports: `import a.b` gives a.b; `from a.b import c` gives a.b
    and a.b.c (c may be a module or a name in a.b)."""
    text = _source(path)
    names = [m.group(1) for m in _IMPORT.finditer(text)]
    for match in _FROM.finditer(text):
        module, imported = match.groups()
        names.append(module)
        for alias in imported.strip("() \t").replace("\n", " ").split(","):
            if alias.split():
                names.append(f"{module}.{alias.split()[0]}")
    return tuple(names)


@functools.cache
def _files(name: str, root: Path) -> tuple[Path, ...]:
    """The files that importing `name` runs: each package's __init__.py on the way and the module itself."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return ()
    found = []
    for depth in range(1, len(parts) + 1):
        base = root.joinpath(*parts[:depth])
        if (base / "__init__.py").is_file():
            found.append(base / "__init__.py")
        elif base.with_suffix(".py").is_file():
            found.append(base.with_suffix(".py"))
            break
        else:
            break
    return tuple(found)


def closure(*programs: str | Path, root: Path = SOURCE_ROOT) -> list[Path]:
    """The programs and the project modules they import, transitively, in a stable order."""
    seen: dict[Path, None] = {}
    todo = [Path(p).resolve() for p in programs]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        for name in _imports(path):
            todo += [f for f in _files(name, root) if f not in seen]
        todo += [path.with_name(name) for name in _RUNS.findall(_source(path)) if path.with_name(name).is_file()]
    return sorted(seen, key=lambda p: (p.suffix != ".py" or PACKAGE in p.parts, str(p)))


def digest(*programs: str | Path, root: Path = SOURCE_ROOT) -> str:
    """sha256 of the closure's file names (relative to the source root) and contents."""
    sha = hashlib.sha256()
    for path in closure(*programs, root=root):
        name = path.relative_to(root) if path.is_relative_to(root) else path.name
        sha.update(f"{name}\0".encode() + path.read_bytes() + b"\0")
    return sha.hexdigest()
