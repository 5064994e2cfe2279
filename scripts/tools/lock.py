"""The environment's lock (requirements.lock, written by pip-compile: `make lock`) and the direct pins it is
resolved from (singularity/requirements.in, requirements-dev.in), read for the tests and the GPU bundle; the vLLM
environment's lock (requirements-vllm.lock from requirements-vllm.in) likewise."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"
DIRECT = (REPO / "singularity" / "requirements.in", REPO / "requirements-dev.in")
# vLLM's environment apart (`make vllm-env`, .venv-vllm): its own pins and lock, for the vLLM tests only.
VLLM_LOCK = REPO / "requirements-vllm.lock"
VLLM_DIRECT = REPO / "requirements-vllm.in"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^]]*\])?==([^\s;\\#]+)")


def canonical(name: str) -> str:
    """PEP 503's normalised name: `Foo_Bar.baz` -> `foo-bar-baz`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """canonical name -> version of every `name==version` requirement line of a requirements file."""
    found = {}
    for line in path.read_text().splitlines():
        match = _PIN.match(line.strip())
        if match:
            found[canonical(match.group(1))] = match.group(2)
    return found


def locked(path: Path = LOCK) -> dict[str, str]:
    """The lock: canonical name -> version (local build tags such as torch's `+cpu` kept)."""
    return pins(path)


def hashes(path: Path = LOCK) -> dict[str, list[str]]:
    """canonical name -> the sha256 hashes the lock allows for it."""
    entries = re.split(r"\n(?=[A-Za-z0-9])", path.read_text())
    found = {}
    for entry in entries:
        match = _PIN.match(entry)
        if match:
            found[canonical(match.group(1))] = re.findall(r"--hash=sha256:([0-9a-f]{64})", entry)
    return found


def direct() -> dict[str, str]:
    """The direct pins of both input files."""
    return {name: version for path in DIRECT for name, version in pins(path).items()}
