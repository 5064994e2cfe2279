"""training.strategy fsdp end to end through `snakemake --profile profiles/local`: two training processes on the CPU
(torchrun, gloo, resources.processes_per_node 2) shard the tiny demo model with plain LoRA (the demo's 4-bit
quantisation does not run sharded on the CPU: the override turns it off). The run is stopped mid-training as
Slurm's warning does (SIGUSR1 to the launcher), fails, and the next run resumes from the sharded checkpoint,
finishes, and merges. Its own project with a short training run (not a copy of the demo: the demo's 480 steps
are not needed here), evaluation off."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.common import REPO
from support.workflow import run_workflow, workflow_command

pytestmark = pytest.mark.e2e
MAX_STEPS = 30
FSDP = ("--config", "evaluate__enabled=false", "training__strategy=fsdp", "training__quantization=none", "resources__processes_per_node=2",
        f"training__max_steps={MAX_STEPS}", "training__save_steps=1000", "training__eval_steps=1000",
        "training__logging_steps=5")


def launcher_pid(workdir: Path) -> int | None:
    """The pid of this project's train launcher (scripts/launch.py running in workdir), if it runs."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if any(part.endswith(b"scripts/launch.py") for part in cmdline) and b"--preflight" in cmdline \
                    and Path(proc / "cwd").resolve() == workdir.resolve():
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def logged_steps(log: Path) -> list[int]:
    return [int(n) for n in re.findall(rf"(?<!eval )step (\d+)/{MAX_STEPS} ", log.read_text())] if log.is_file() else []


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("fsdp-project")
    (workdir / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (workdir / "data").symlink_to(REPO / "data")
    run = workdir / "results" / "demo"
    cmd, env = workflow_command(*FSDP)
    first = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and first.poll() is None:
            if (steps := logged_steps(run / "logs" / "train.log")) and steps[-1] >= 5:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"training never got to step 5:\n{first.communicate()[0][-4000:]}")
        pid = launcher_pid(workdir)
        assert pid, "no launcher found"
        stopped_log_steps = logged_steps(run / "logs" / "train.log")
        import os

        os.kill(pid, signal.SIGUSR1)  # what the launcher does itself before a Slurm time limit
        out = first.communicate(timeout=300)[0]
    finally:
        if first.poll() is None:
            first.kill()
    stopped_train_log = (run / "logs" / "train.log").read_text()
    checkpoints = sorted(p.name for p in run.glob("checkpoints/*/checkpoint-*"))
    run_workflow(workdir, *FSDP)
    return dict(workdir=workdir, run=run, first_rc=first.returncode, first_out=out, stopped_log=stopped_train_log,
                stopped_log_steps=stopped_log_steps, checkpoints=checkpoints,
                train=json.loads((run / "metrics" / "train.json").read_text()),
                merge=json.loads((run / "metrics" / "merge.json").read_text()),
                preflight=json.loads((run / "preflight.json").read_text()),
                log=(run / "logs" / "train.log").read_text())


def test_the_stop_saved_a_sharded_checkpoint_and_failed_the_job(fsdp_run):
    assert fsdp_run["first_rc"] != 0
    assert re.search(r"stopped by SIGUSR1 at step \d+", fsdp_run["stopped_log"]), fsdp_run["stopped_log"][-3000:]
    assert len(fsdp_run["checkpoints"]) == 1, fsdp_run["checkpoints"]
    checkpoint = next(fsdp_run["run"].glob("checkpoints/*/checkpoint-*"))
    assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert (checkpoint / "adapter_model.safetensors").is_file()


def test_the_next_run_resumes_under_fsdp_and_finishes(fsdp_run):
    train, log = fsdp_run["train"], fsdp_run["log"]
    resumed_at = int(train["resumed_from"].rsplit("-", 1)[1])
    assert fsdp_run["checkpoints"] == [f"checkpoint-{resumed_at}"]
    assert fsdp_run["stopped_log_steps"][-1] <= resumed_at < MAX_STEPS
    assert f"resuming from checkpoint-{resumed_at}" in log and train["steps"] == MAX_STEPS
    assert logged_steps(fsdp_run["run"] / "logs" / "train.log")[0] > resumed_at  # the count continued
    assert train["strategy"] == "fsdp" and train["world_size"] == 2 and train["quantization"] == "none"
    assert train["adapter_max_abs_change"] > 0
    assert "strategy fsdp" in log and "world size 2" in log and "torch.distributed.run" in log
    assert re.search(r"shards\s+weights, gradients, optimizer state in 2 shards \(FSDP\)", log)


def test_preflight_chose_fsdp_for_two_processes(fsdp_run):
    strategy = fsdp_run["preflight"]["strategy"]
    assert strategy["chosen"] == "fsdp" and strategy["world_size"] == 2
    assert strategy["per_gpu_mb"]["fsdp"]["mb_per_gpu"] > 0


def test_the_fsdp_adapter_merges(fsdp_run):
    assert fsdp_run["merge"]["max_abs_logit_diff"] <= 1e-3
    assert fsdp_run["merge"]["adapter_effect_max_abs_logit"] > 0.1  # the adapter changed the model
    assert (fsdp_run["run"] / "merged" / "model.safetensors").is_file()
