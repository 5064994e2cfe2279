"""The run's deliverables are targets, and one controller runs a run (workflow/rules/controller.smk), end to end on
copies of the finished demo project: merged/ deleted, then a merge killed with its controller during a forced
re-run, are rebuilt by the next run; a run that leaves a file the manifest lists missing says so and fails; a
second controller of a running run is refused even after another run and `--unlock` removed Snakemake's lock."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from hpc_finetune.io.files import sha256_file
from support.workflow import copy_project, planned_jobs, run_workflow, stage_pid, wait_for, workflow_command

pytestmark = pytest.mark.e2e
AFTER_MERGE = {"merge", "evaluate", "summary", "plots", "all"}


def assert_manifest_matches_disk(run: Path) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    listed = {a["path"]: a["sha256"] for a in manifest["artifacts"]}
    assert "merged/model.safetensors" in listed and "adapters/adapter_model.safetensors" in listed
    assert {path for path, digest in listed.items() if sha256_file(run / path) != digest} == set()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "leftovers of a killed job"


def test_a_deleted_merged_model_is_rebuilt_and_never_reported_done(demo, tmp_path):
    """merged/ deleted to save space: a run that does not rebuild it (a narrower target) says what is missing and
    fails; a dry run plans merge and what depends on it; the next run rebuilds it and the manifest matches the
    disk. A merged/ that lost one file the manifest lists is set aside and rebuilt the same way."""
    workdir = copy_project(demo, tmp_path / "project")
    run = workdir / "results" / "demo"
    for path in (run / "merged").iterdir():
        path.unlink()
    (run / "merged").rmdir()
    narrow = run_workflow(workdir, "results/demo/data/report.json", check=False)
    assert narrow.returncode != 0 and "Nothing to be done" in narrow.stdout + narrow.stderr
    assert "manifest.json lists" in narrow.stderr and "merged/model.safetensors" in narrow.stderr
    assert "run the workflow again without a target" in narrow.stderr
    dry = run_workflow(workdir, "--dry-run")  # a dry run only warns
    assert planned_jobs(dry) == AFTER_MERGE and "Warning: " in dry.stderr

    run_workflow(workdir)
    assert (run / "merged" / "model.safetensors").is_file()
    assert_manifest_matches_disk(run)
    assert planned_jobs(run_workflow(workdir, "--dry-run")) == set()

    (run / "merged" / "model.safetensors").unlink()
    dry = run_workflow(workdir, "--dry-run")
    assert planned_jobs(dry) == AFTER_MERGE, dry.stderr[-2000:]
    assert "set aside as" in dry.stderr and (run / ".merged.damaged" / "config.json").is_file()


def test_a_merge_killed_with_its_controller_during_a_forced_rerun_is_rebuilt(demo, tmp_path):
    """The scenario of issue 23: `--forcerun merge` (Snakemake deletes merged/ first), then the merge job and the
    controller are killed while the merge writes its partial directory. After `--unlock` (which warns that the
    manifest lists missing files) the next run rebuilds merged/, removes the partial directory, takes over the
    killed controller's run lock with a note, and leaves a manifest that matches the disk."""
    workdir = copy_project(demo, tmp_path / "project")
    run = workdir / "results" / "demo"
    cmd, env = workflow_command("--forcerun", "merge")
    controller = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: list(run.glob(".merged.partial-*")), "the merge's partial directory")
        os.kill(wait_for(lambda: stage_pid(workdir, "scripts/merge.py"), "the merge process"), signal.SIGKILL)
        controller.kill()
    finally:
        controller.kill()
        controller.wait(30)
    assert not (run / "merged").exists() and list(run.glob(".merged.partial-*"))
    unlock = run_workflow(workdir, "--unlock")
    assert "Warning: " in unlock.stderr and "merged/model.safetensors" in unlock.stderr

    rerun = run_workflow(workdir)
    assert planned_jobs(rerun) == AFTER_MERGE
    assert "took over the run lock" in rerun.stderr and f"pid {controller.pid}" in rerun.stderr
    assert "left by an interrupted merge" in (run / "logs" / "merge.log").read_text()
    assert_manifest_matches_disk(run)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


SHORT = ("--config", "training__max_steps=40", "training__save_steps=20", "training__eval_steps=20",
         "training__logging_steps=5")


def test_a_second_controller_of_a_running_run_is_refused_after_its_snakemake_lock_was_removed(demo, tmp_path):
    """Run A trains (paused with SIGSTOP at a logged step, so it is surely still training); an unrelated run B in
    the same directory finishes, which removes Snakemake's directory lock, and `--unlock` does too. A second
    controller for A's run is then refused by the run's own lock, naming A's process, before it starts a job; A,
    resumed, finishes with its own train log."""
    workdir = copy_project(demo, tmp_path / "project")
    run, locks = workdir / "results" / "demo", workdir / ".snakemake" / "locks"
    cmd, env = workflow_command(*SHORT)
    output = tmp_path / "first.log"
    with open(output, "w") as sink:
        first = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT)
    trainer = None
    try:
        wait_for(lambda: "step 5/40 " in read(run / "logs" / "train.log"), "step 5")
        trainer = stage_pid(workdir, "scripts/train.py", launcher="scripts/launch.py")
        os.kill(trainer, signal.SIGSTOP)
        assert list(locks.iterdir())  # A holds Snakemake's lock until another run removes it
        run_workflow(workdir, "--config", "run_name=other", "--", "results/other/model/model.json")
        run_workflow(workdir, "--unlock")
        assert not locks.exists() or not list(locks.iterdir())
        log_before = read(run / "logs" / "train.log")

        second = run_workflow(workdir, *SHORT, check=False)
        assert second.returncode != 0
        assert "is being run by another Snakemake controller" in second.stderr, second.stderr[-3000:]
        assert f"pid {first.pid}" in second.stderr and "snakemake --unlock` does not" in second.stderr
        assert read(run / "logs" / "train.log").startswith(log_before)
        assert "rule train:" not in second.stdout + second.stderr  # refused before it started a job
    except BaseException:  # leave no run behind
        first.kill()
        if trainer:
            os.kill(trainer, signal.SIGKILL)
        raise
    finally:
        if trainer:
            with contextlib.suppress(ProcessLookupError):
                os.kill(trainer, signal.SIGCONT)
    assert first.wait(600) == 0, output.read_text()[-3000:]
    train = json.loads((run / "metrics" / "train.json").read_text())
    assert train["steps"] == 40 and train["resumed_from"] is None
    log = (run / "logs" / "train.log").read_text()
    assert log.count("step 5/40 ") == 1 and "in use by" not in log  # one trainer, one log
    assert_manifest_matches_disk(run)
