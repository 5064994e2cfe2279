"""Runs killed without warning (node failure, the OOM killer, a killed controller): the next run of the workflow
resumes training from the last complete checkpoint, never from a half-written one, and no output directory is
ever left half written. Each scenario starts from a copy of the finished demo project with a shorter training
run (so only train and the stages after it run), kills something mid-training with SIGKILL, and runs the
workflow again. What the resumed run trained is compared with the train job of the same short run, run once to its
end (`uninterrupted`). The Slurm case (scancel) is in test_slurm.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from support.workflow import copy_project, run_workflow, stage_pid, wait_for, workflow_command

pytestmark = pytest.mark.e2e
# Short: the kill is timed by stopping the trainer (SIGSTOP) the moment it has gone past a complete checkpoint, not
# by a window wide enough for a poll, so three save periods are enough.
MAX_STEPS, SAVE_STEPS = 30, 10
SHORT_RUN = ("--config", f"training__max_steps={MAX_STEPS}", f"training__save_steps={SAVE_STEPS}",
             f"training__eval_steps={SAVE_STEPS}", "training__logging_steps=5")


def start(workdir: Path) -> subprocess.Popen:
    cmd, env = workflow_command(*SHORT_RUN)
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def logged_steps(log: Path) -> list[int]:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [int(n) for n in re.findall(rf"(?<!eval )\bstep (\d+)/{MAX_STEPS} ", text)]


def complete_checkpoints(run: Path) -> list[int]:
    """Steps of the checkpoints whose trainer_state.json (written last) is whole."""
    steps = []
    for state in run.glob("checkpoints/*/checkpoint-*/trainer_state.json"):
        try:
            steps.append(json.loads(state.read_text())["global_step"])
        except (ValueError, KeyError):
            continue
    return sorted(steps)


def trainer_pid(workdir: Path) -> int | None:
    """The train stage's Python process (not its launcher) working in `workdir`."""
    return stage_pid(workdir, "scripts/train.py", launcher="scripts/launch.py")


def kill_between_checkpoints(workdir: Path, victim: str) -> tuple[int, int]:
    """Start the short run; once the first periodic checkpoint is complete and training has gone on past it,
    stop the trainer where it is (SIGSTOP: no step or save goes on while the state is read), then SIGKILL it
    ('trainer'), or SIGKILL the Snakemake controller and let the trainer go on ('controller'). (checkpoint, last
    logged step) at the moment of the kill."""
    run, log = workdir / "results" / "demo", workdir / "results" / "demo" / "logs" / "train.log"
    controller = start(workdir)
    try:
        wait_for(lambda: any(s > SAVE_STEPS for s in logged_steps(log)), f"a step after {SAVE_STEPS}")
        trainer = trainer_pid(workdir)
        os.kill(trainer, signal.SIGSTOP)
        checkpoint, step = complete_checkpoints(run)[-1], logged_steps(log)[-1]
        if victim == "trainer":
            os.kill(trainer, signal.SIGKILL)
            assert controller.wait(120) != 0
        else:
            controller.kill()
            controller.wait(10)
            os.kill(trainer, signal.SIGCONT)
    finally:
        if controller.poll() is None:
            controller.kill()
    assert checkpoint < step < checkpoint + SAVE_STEPS, (checkpoint, step)
    return checkpoint, step


@pytest.fixture(scope="module")
def uninterrupted(demo, tmp_path_factory) -> Path:
    """The run directory of the short run's train job run once to its end, as the workflow runs it (same threads
    and environment; `--until train`: no stage after it), in another copy of the demo project."""
    workdir = copy_project(demo, tmp_path_factory.mktemp("uninterrupted") / "project")
    run_workflow(workdir, *SHORT_RUN, "--until", "train")
    return workdir / "results" / "demo"


def curves(train: dict) -> list[tuple[int, str, float]]:
    """The loss curve of a train.json: (step, loss or eval_loss, value)."""
    return [(e["step"], k, e[k]) for e in train["log_history"] for k in ("loss", "eval_loss") if k in e]


def same_training(run: Path, reference: Path) -> None:
    """`run` trained what `reference` trained: the same fingerprint (settings, data, model, device, code), loss
    curve and adapter, bit for bit. On this single-process QLoRA path on the CPU the trainer restores the RNG
    states and skips the batches already seen, and the adapter resumes in its own dtype (bf16): measured max
    difference 0.0 (resumed in float32, as before the fix, the adapter weights were 1.7e-3 apart)."""
    from safetensors.torch import load_file

    mine, theirs = (json.loads((r / "metrics" / "train.json").read_text()) for r in (run, reference))
    assert mine["fingerprint"] == theirs["fingerprint"] and theirs["resumed_from"] is None
    pairs = list(zip(curves(mine), curves(theirs), strict=True))
    assert all(a[:2] == b[:2] for a, b in pairs)
    loss_gap = max(abs(a[2] - b[2]) for a, b in pairs)
    weights = [load_file(r / "adapters" / "adapter_model.safetensors") for r in (run, reference)]
    assert weights[0].keys() == weights[1].keys()
    assert {str(v.dtype) for v in weights[0].values()} == {str(v.dtype) for v in weights[1].values()}
    weight_gap = max(float((weights[0][k].float() - v.float()).abs().max()) for k, v in weights[1].items())
    assert loss_gap == 0 and weight_gap == 0, f"loss curves {loss_gap:.3g} apart, adapter weights {weight_gap:.3g}"


def adapter_layout(adapters: Path) -> tuple[dict, dict]:
    """(adapter_config.json without paths, {tensor: shape}) of a saved adapter."""
    from safetensors import safe_open

    config = json.loads((adapters / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path", None)
    config["target_modules"] = sorted(config["target_modules"])  # PEFT writes a set, in no fixed order
    with safe_open(str(adapters / "adapter_model.safetensors"), "pt") as weights:
        shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
    return config, shapes


def no_half_written_outputs(run: Path) -> None:
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary outputs left behind: {leftovers}"
    assert (run / "adapters" / "adapter_model.safetensors").is_file()
    assert (run / "merged" / "model.safetensors").is_file()


def test_a_trainer_killed_between_checkpoints_resumes_from_the_last_complete_one(demo, uninterrupted, tmp_path):
    """SIGKILL of the train process between two periodic checkpoints; a half-written checkpoint after it (a kill
    while saving) is set aside. The next run resumes from the last complete checkpoint: no step lost beyond
    save_steps, the step count continues, and the loss curve and adapter are those of an uninterrupted run."""
    workdir = copy_project(demo, tmp_path / "project")
    run = workdir / "results" / "demo"
    checkpoint, killed_at = kill_between_checkpoints(workdir, "trainer")
    assert not (run / "adapters").exists(), "a killed run must leave no adapter a later stage could take"
    fingerprint = next(run.glob(f"checkpoints/*/checkpoint-{checkpoint}")).parent
    half = fingerprint / f"checkpoint-{checkpoint + SAVE_STEPS}"
    if not half.exists():  # the kill came before the next save began: stage one cut off while saving
        shutil.copytree(fingerprint / f"checkpoint-{checkpoint}", half)
        (half / "trainer_state.json").unlink()
        optimizer = half / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:1000])

    run_workflow(workdir, *SHORT_RUN)
    log = (run / "logs" / "train.log").read_text()
    assert f"checkpoint {half.relative_to(workdir)} is incomplete" in log, log[-3000:]
    assert f"resuming from checkpoint-{checkpoint}" in log
    assert logged_steps(run / "logs" / "train.log")[0] == checkpoint + 5  # the count continues
    train = json.loads((run / "metrics" / "train.json").read_text())
    assert train["steps"] == MAX_STEPS and train["resumed_from"].endswith(f"checkpoint-{checkpoint}")
    assert killed_at - checkpoint < SAVE_STEPS  # what was redone
    assert [e["step"] for e in train["log_history"] if "loss" in e][0] == 5  # history from before the kill
    same_training(run, uninterrupted)
    assert adapter_layout(run / "adapters") == adapter_layout(demo / "results" / "demo" / "adapters")
    no_half_written_outputs(run)
    assert (fingerprint / f"broken-{half.name}").is_dir()


def test_a_killed_controller_leaves_a_trainer_that_the_next_run_waits_for(demo, uninterrupted, tmp_path):
    """SIGKILL of Snakemake while the train job runs: the train job, now orphaned, goes on. The user unlocks the
    directory and runs the workflow again: its train job waits for the orphan instead of writing the same
    checkpoints, then takes the adapter of the finished run; merge, evaluate and summary complete."""
    workdir = copy_project(demo, tmp_path / "project")
    run = workdir / "results" / "demo"
    kill_between_checkpoints(workdir, "controller")
    orphan = trainer_pid(workdir)
    assert orphan, "the train job should outlive the killed controller"
    run_workflow(workdir, "--unlock")
    run_workflow(workdir, *SHORT_RUN)
    assert trainer_pid(workdir) is None
    log = (run / "logs" / "train.log").read_text(errors="replace")
    assert "this run's checkpoints are in use by" in log and "Waiting for it to end" in log, log[-3000:]
    assert "is the end of the run: taking its adapter" in log or "resuming from checkpoint-" in log
    train = json.loads((run / "metrics" / "train.json").read_text())
    assert train["steps"] == MAX_STEPS
    same_training(run, uninterrupted)
    assert adapter_layout(run / "adapters") == adapter_layout(demo / "results" / "demo" / "adapters")
    no_half_written_outputs(run)
