"""Running the workflow as a user does (snakemake with one of the repository's profiles, in a project directory),
reading what a dry run plans, and watching a run's processes (to kill or pause them at a known step)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.common import REPO, SNAKEMAKE


def workflow_command(*args: str, profile: str = "local", env: dict | None = None,
                     path: str | None = None) -> tuple[list[str], dict]:
    """The snakemake command line with one of the repository's profiles, and its environment: this environment's
    tools first on PATH (or `path`), `env` added."""
    environ = os.environ | {"PATH": path or f"{Path(sys.executable).parent}:{os.environ['PATH']}"} | (env or {})
    return [*SNAKEMAKE, "--profile", str(REPO / "profiles" / profile), "--cores", "2", *args], environ


def run_workflow(workdir: Path, *args: str, profile: str = "local", env: dict | None = None,
                 path: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """snakemake (workflow_command) in `workdir`; a failure fails the test unless check is false."""
    cmd, environ = workflow_command(*args, profile=profile, env=env, path=path)
    result = subprocess.run(cmd, cwd=workdir, env=environ, capture_output=True, text=True)
    if check and result.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def planned_jobs(result: subprocess.CompletedProcess) -> set[str]:
    """Rule names from the 'Job stats' table of a dry run; empty when there is nothing to do."""
    return set(planned_counts(result))


def planned_counts(result: subprocess.CompletedProcess) -> dict[str, int]:
    """{rule: number of jobs} from the 'Job stats' table of a dry run; empty when there is nothing to do."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def copy_project(demo: Path, dst: Path) -> Path:
    """The finished demo project without its checkpoints (a test's own settings make a new fingerprint)."""
    return Path(shutil.copytree(demo, dst, symlinks=True, ignore=shutil.ignore_patterns("checkpoints")))


def wait_for(condition, what: str, timeout: float = 300):
    """Poll `condition` until it returns something true (returned); fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def stage_pid(workdir: Path, program: str, launcher: str | None = None) -> int | None:
    """The process running the stage program `program` (e.g. scripts/train.py) with `workdir` as its working
    directory; not its launcher's (a command line that also names `launcher`)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if os.readlink(proc / "cwd") == str(workdir) and any(a.endswith(program.encode()) for a in argv):
                if not (launcher and any(a.endswith(launcher.encode()) for a in argv)):
                    return int(proc.name)
        except (OSError, ValueError):
            continue
    return None
