"""Portable resources of the rules that Slurm turns into sbatch options: memory and time that grow on each retry,
memory that follows the size of a job's data, and the GPU and node placement of the train job; and the check, when
the workflow starts, that the slurm executor can learn when a job ends."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def scaled(cfg: dict, base: int):
    """A resource (memory, time limit) that grows on each retry of a failed job: base, base x f, base x f² …
    (f = resources.retry_factor; retries: the profile's `retries`)."""
    factor = cfg["resources"]["retry_factor"]

    def value(wildcards, attempt):
        return int(base * factor ** (attempt - 1))

    return value


def follows_data(cfg: dict, base: int, names: tuple[str, ...], mb_per_mb: float):
    """A memory request (MB) that follows the job's data: `base` (the floor: the program, its libraries, the
    model) plus `mb_per_mb` MB for each MB of the rule's inputs `names` (files, or directories: every file in
    them), grown on each retry like scaled(). Evaluated when the job is about to run: an input that does not exist
    yet raises FileNotFoundError, which Snakemake takes as "to be determined" until it does."""
    factor = cfg["resources"]["retry_factor"]

    def value(wildcards, input, attempt):
        paths = []
        for name in names:
            found = getattr(input, name, [])
            paths += [found] if isinstance(found, str) else list(found)
        return int((base + mb_per_mb * sum(map(tree_bytes, paths)) / 2**20) * factor ** (attempt - 1))

    return value


def tree_bytes(path: str) -> int:
    """Bytes of a file, or of every file under a directory."""
    path = Path(path)
    if not path.is_dir():
        return path.stat().st_size
    return sum((Path(root) / f).stat().st_size for root, _, files in os.walk(path) for f in files)


def train_placement(cfg: dict) -> dict:
    """GPU and node resources of the train job. One node: `gpu` (sbatch --gpus). Several nodes: GPUs per node
    (--gres), one task per node, and `mpi` so that the Slurm job step leaves the `srun` to the launcher."""
    res = cfg["resources"]
    if res["nodes"] <= 1:
        return {"gpu": res["gpus"]}
    placement = {"nodes": res["nodes"], "mpi": "srun", "tasks": res["nodes"], "tasks_per_gpu": 0}
    if res["gpus"]:
        placement["gres"] = f"gpu:{res['gpus']}"
    return placement


def run_placement(runs: dict[str, dict]) -> dict:
    """train_placement as rule resources for the runs `runs` ({name: config}): each a function of the job's
    `run` wildcard. The runs must agree on one node or several (the resources a rule declares are fixed)."""
    from hpc_finetune.workflow.config import ConfigError

    shapes = {name: sorted(train_placement(cfg)) for name, cfg in runs.items()}
    if len({tuple(shape) for shape in shapes.values()}) > 1:
        raise ConfigError("config key resources.nodes: the runs of an experiment train either all on one node or all "
                          f"on several; these differ: {', '.join(shapes)}")
    return {key: (lambda wildcards, key=key: train_placement(runs[wildcards.run])[key])
            for key in next(iter(shapes.values()), [])}


def status_command_problem(executor: str | None, status_command: str | None, timeout: float = 30) -> str | None:
    """Why the slurm executor would hang, or None. It learns that a job ended from `sacct` unless told to use
    `squeue`; where job accounting is off, sacct fails on every poll and the plugin keeps waiting, silently, after
    the first job has finished. Asked once when the workflow starts (onstart, before anything is submitted)."""
    if executor != "slurm" or status_command == "squeue":
        return None
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobIDRaw,State", "-S", "now"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        why = "sacct is not installed here"
    except subprocess.TimeoutExpired:
        why = f"`{' '.join(cmd)}` did not answer within {timeout:.0f} s"
    else:
        if result.returncode == 0:
            return None
        said = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        why = f"`{' '.join(cmd)}` exited with {result.returncode}: {said[-1] if said else 'no message'}"
    return (
        f"Slurm job accounting does not answer on this cluster ({why}). The slurm executor asks sacct whether a job "
        "has ended: it would submit the first job and then wait for it forever. Add `--slurm-status-command squeue` "
        "to the snakemake command line, or `slurm-status-command: squeue` to the profile (profiles/slurm/config.yaml; "
        "squeue lists finished jobs for MinJobAge seconds, which slurm.conf should set to 120 or more), and start "
        "again. Nothing was submitted."
    )
