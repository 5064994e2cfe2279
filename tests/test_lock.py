"""The environment is the lock: requirements.lock (pip-compile, `make lock`) names every package with its version
and hashes; what is installed equals it, what the code imports is declared, and everything that installs the stack
(make, finetune.def, the conda env, pyproject) reads the same pins."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib import metadata

import yaml
from support.common import REPO
from tools import lock

# Distributions installed that are not the lock's business: this project, installed editable by make.
OWN = {"hpc-finetune"}


def installed() -> dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = lock.canonical(dist.metadata["Name"])
        if name not in OWN:
            found[name] = dist.version
    return found


def test_the_installed_environment_equals_the_lock():
    """Nothing missing, nothing more, no other version: a fresh machine gets exactly what the tests run."""
    have, want = installed(), lock.locked()
    missing = {n: v for n, v in want.items() if n not in have}
    extra = {n: v for n, v in have.items() if n not in want}
    other = {n: f"installed {have[n]}, locked {v}" for n, v in want.items() if n in have and have[n] != v}
    assert not (missing or extra or other), (
        f"the environment differs from requirements.lock: missing {missing}, not in the lock {extra}, "
        f"other versions {other}. Recreate it: rm -rf .venv && make env"
    )


def test_every_locked_package_is_pinned_exactly_with_hashes():
    entries = lock.hashes()
    assert len(entries) > 150, "the lock holds the whole environment, transitive packages included"
    assert entries.keys() == lock.locked().keys()
    assert not [name for name, found in entries.items() if not found], "a lock entry without a hash"
    # torch's variant is explicit: the CPU build here (the image takes the CUDA build of the same version)
    assert lock.locked()["torch"].endswith("+cpu")


def test_the_direct_pins_are_exact_and_the_lock_agrees():
    """The lock was resolved from the current pins: edit a *.in file, then `make lock`."""
    locked = lock.locked()
    for path in lock.DIRECT:
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert "==" in line, f"{path.name}: {line} is not pinned with =="
        for name, version in lock.pins(path).items():
            assert name in locked, f"{name} ({path.name}) is not in requirements.lock: run make lock"
            assert locked[name].split("+")[0] == version, (
                f"{name}: {path.name} pins {version}, requirements.lock has {locked[name]}: run make lock")


def imported_top_level_modules() -> dict[str, str]:
    """Top-level module -> a file that imports it, over the library, the stage programs, the tools, the tests and
    the workflow; the repository's own modules and the standard library left out."""
    scripts = REPO / "scripts"
    own = {"hpc_finetune", "support", "tools", *(p.stem for p in scripts.glob("*.py")),
           *(p.stem for p in (scripts / "tools").rglob("*.py")), *(p.stem for p in (REPO / "tests").rglob("*.py"))}
    sources = [*scripts.rglob("*.py"), *(REPO / "tests").rglob("*.py")]
    found = {}
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in own:
                    found.setdefault(top, str(path.relative_to(REPO)))
    # the Snakefile and the rule files import snakemake's API
    found.setdefault("snakemake", "Snakefile")
    return found


def test_everything_the_code_imports_is_a_declared_dependency():
    """Not merely installed because something else pulled it in: a new release of that something could drop it."""
    declared = lock.direct()
    providers = metadata.packages_distributions()
    undeclared = {}
    for module, where in imported_top_level_modules().items():
        dists = {lock.canonical(d) for d in providers.get(module, [])}
        assert dists, f"{where} imports {module}, which no installed distribution provides"
        if not dists & declared.keys():
            undeclared[module] = (where, sorted(dists))
    assert not undeclared, (
        f"imported but not declared in singularity/requirements.in or requirements-dev.in: {undeclared}")


def test_conda_env_pins_equal_the_direct_runtime_pins():
    env = yaml.safe_load((REPO / "workflow" / "envs" / "finetune.yaml").read_text())
    pip = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    assert {lock.canonical(p.split("==")[0]): p.split("==")[1] for p in pip} == lock.pins(lock.DIRECT[0])


def test_pyproject_reads_its_dependencies_from_the_direct_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    dynamic = project["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"]["file"] == ["singularity/requirements.in"]
    assert dynamic["optional-dependencies"]["dev"]["file"] == ["requirements-dev.in"]


def test_make_installs_the_lock_hash_checked_and_nothing_more():
    makefile = (REPO / "Makefile").read_text()
    assert "--require-hashes --no-deps -r requirements.lock" in makefile
    assert "$(STAMP): requirements.lock" in makefile
    assert "pip-compile" in makefile and "--generate-hashes" in makefile
