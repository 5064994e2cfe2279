"""The controller's own checks (hpc_finetune.workflow.runlock and .controller) with real processes and files: one
controller per run, a killed holder's lock taken over with a note, and the manifest against the disk. The
workflow-level scenarios are in tests/e2e/test_controller_workflow.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hpc_finetune.summary.manifest import artifacts, missing_artifacts
from hpc_finetune.workflow import runlock
from hpc_finetune.workflow.controller import damaged, leftovers, set_aside
from support.common import REPO

HOLD = "import sys; from hpc_finetune.workflow import runlock; fh, note = runlock.take(sys.argv[1]); " \
       "print('taken', note, flush=True); sys.stdin.read()"


def hold(run_dir: Path) -> subprocess.Popen:
    """A second process holding the run's lock until its stdin closes (or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("taken")
    return proc


def test_a_second_controller_of_the_run_is_refused_with_the_holder_and_the_fix(tmp_path):
    run = tmp_path / "results" / "demo"
    holder = hold(run)
    try:
        with pytest.raises(runlock.RunInUse) as refused:
            runlock.take(run)
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and "snakemake --unlock` does not" in message
        assert "Wait for that run to end, or stop it" in message and str(run / "logs" / "controller.lock") in message
        assert runlock.holder(run).startswith("host ") and f"pid {holder.pid}" in runlock.holder(run)
        other, note = runlock.take(tmp_path / "results" / "other")  # another run_name: a lock of its own
        assert note is None
        runlock.release(other)
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_controller_is_taken_over_with_a_note(tmp_path):
    run = tmp_path / "results" / "demo"
    holder = hold(run)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert runlock.holder(run) is None  # the kernel dropped it; its line is still in the file
    fh, note = runlock.take(run)
    assert note.startswith("took over the run lock") and f"pid {holder.pid}" in note
    runlock.release(fh)
    fh, note = runlock.take(run)  # released cleanly: nothing to take over
    assert note is None
    runlock.release(fh)


def write_run(run: Path) -> list[str]:
    """A run directory with a demo-like layout and its manifest; returns the roots the manifest covers."""
    for name, text in {"adapters/adapter_model.safetensors": "a", "adapters/.snakemake_timestamp": "",
                       "merged/model.safetensors": "m" * 10, "merged/config.json": "{}",
                       "merged/.snakemake_timestamp": "", "data/train.jsonl": "{}\n", "training.env": "X=1\n"}.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    roots = [str(run / name) for name in ("adapters", "merged", "data/train.jsonl")]
    listed = artifacts(run, [*roots, run / "training.env"])
    (run / "manifest.json").write_text(json.dumps({"artifacts": listed}))
    stamp = (run / "manifest.json").stat().st_mtime - 10  # the jobs ended before the summary wrote the manifest
    for name in ("adapters", "merged"):
        os.utime(run / name / ".snakemake_timestamp", (stamp, stamp))
    return roots


def test_the_manifest_lists_the_files_of_its_roots_and_the_check_names_what_is_missing(tmp_path):
    run = tmp_path / "demo"
    roots = write_run(run)
    listed = [a["path"] for a in json.loads((run / "manifest.json").read_text())["artifacts"]]
    assert listed == ["adapters/adapter_model.safetensors", "data/train.jsonl", "merged/config.json",
                      "merged/model.safetensors", "training.env"]  # no hidden files
    assert missing_artifacts(run / "manifest.json") == []
    (run / "merged" / "model.safetensors").unlink()
    (run / "data" / "train.jsonl").unlink()
    missing = missing_artifacts(run / "manifest.json")
    assert missing == ["data/train.jsonl", "merged/model.safetensors"]
    assert damaged(run, roots, missing) == [run / "merged"]  # a file root is a target: Snakemake sees it missing
    aside = set_aside(run / "merged")
    assert aside == run / ".merged.damaged" and (aside / "config.json").is_file() and not (run / "merged").exists()


def test_a_directory_installed_after_the_manifest_is_not_damaged(tmp_path):
    """A merge whose controller was killed installs a new merged/ (no Snakemake timestamp yet, other shards):
    the manifest is what is stale, not the directory."""
    run = tmp_path / "demo"
    roots = write_run(run)
    (run / "merged" / "model.safetensors").rename(run / "merged" / "model-00001-of-00001.safetensors")
    (run / "merged" / ".snakemake_timestamp").unlink()
    assert damaged(run, roots, missing_artifacts(run / "manifest.json")) == []


def test_leftovers_of_killed_jobs_beside_a_finished_deliverable_are_found(tmp_path):
    run = tmp_path / "demo"
    roots = write_run(run)
    for name in (".merged.partial-123", ".merged.old-77", ".adapters.tmp", ".adapters.old"):
        (run / name).mkdir()
    (run / ".manifest.json.x.tmp").write_text("")  # a file: not a job's directory
    found = leftovers(roots)
    assert [p.name for p in found] == [".adapters.old", ".adapters.tmp", ".merged.old-77", ".merged.partial-123"]
    (run / "merged").rename(run / "elsewhere")  # missing: its stage will remove or reuse them when it runs
    assert [p.name for p in leftovers(roots)] == [".adapters.old", ".adapters.tmp"]


def test_the_workflow_has_one_handler_of_each_kind():
    """Snakemake keeps only the last `onstart:` (`onsuccess:`, `onerror:`) defined: a second one silently replaced
    the Slurm accounting check once. Every start-time check lives in workflow/rules/controller.smk's one handler."""
    files = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    for handler in ("onstart", "onsuccess", "onerror"):
        defined = [f.name for f in files for line in f.read_text().splitlines() if line.startswith(f"{handler}:")]
        assert len(defined) <= 1, f"{handler} is defined in {defined}: only the last one would run"
    assert "status_command_problem(" in (REPO / "workflow" / "rules" / "controller.smk").read_text()
