"""Portable resources of the rules that Slurm turns into sbatch options: memory and time that grow on each retry,
and the GPU and node placement of the train job."""

from __future__ import annotations


def scaled(cfg: dict, base: int):
    """A resource (memory, time limit) that grows on each retry of a failed job: base, base x f, base x f² …
    (f = resources.retry_factor; retries: the profile's `retries`)."""
    factor = cfg["resources"]["retry_factor"]

    def value(wildcards, attempt):
        return int(base * factor ** (attempt - 1))

    return value


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
