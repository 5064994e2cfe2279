"""One source of truth for the training stack: singularity/requirements.txt. Everything that installs the stack
must ask for exactly those pins."""

from __future__ import annotations

import tomllib
from importlib import metadata

import yaml
from support.common import REPO


def pins(path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_conda_env_pins_equal_the_requirements():
    env = yaml.safe_load((REPO / "workflow" / "envs" / "finetune.yaml").read_text())
    pip = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    assert pip == pins(REPO / "singularity" / "requirements.txt")


def test_pyproject_reads_its_dependencies_from_the_requirements():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    dynamic = project["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"]["file"] == ["singularity/requirements.txt"]


def test_every_pin_is_exact_and_installed():
    for line in pins(REPO / "singularity" / "requirements.txt") + pins(REPO / "requirements-dev.txt"):
        name, _, version = line.partition("==")
        assert version, f"{line} is not pinned with =="
        name = name.split("[")[0]  # extras: moto[server]
        assert metadata.version(name).split("+")[0] == version, f"{name} installed differs from its pin {version}"
