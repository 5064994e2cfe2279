"""The workflow on a real Slurm cluster (tests/support/slurm_cluster.py: slurmctld + slurmd on this machine, partitions
`cpu` and `gpu`, two placeholder GPUs), through `snakemake --profile profiles/slurm` as users run it, plus the one
override a cluster without job accounting needs (`--slurm-status-command squeue`).

One demo run is shared by the tests that read Slurm's records of it; the two-process and the time-limit scenarios
each start from a copy of that finished project, so that only the jobs they change run again.

Skipped (with the reason) when the cluster cannot be had (not root, no apt); REQUIRE_SLURM=1 (CI) makes that a
failure instead.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import slurm_cluster
from support.common import REPO, SNAKEMAKE
from support.workflow import planned_jobs

pytestmark = pytest.mark.e2e
# A bound for a run that hangs, not a verdict on speed: the demo's 480 steps took 25 min on a loaded 2-core machine.
RUN_TIMEOUT = 3600
NO_ACCOUNTING = ["--slurm-status-command", "squeue"]  # the one override: this cluster has no sacct
# Test speed only: the plugin waits 40 s before its first status check by default.
QUICK_POLLING = ["--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "3"]
CPU_STAGES = ("build_demo_model", "model", "prepare_data", "summary", "plots")
GPU_STAGES = ("preflight", "train", "merge", "evaluate")
# Resources the demo's jobs ask for (resources are not params: changing them re-runs nothing). A time limit far
# beyond the demo's training (480 steps: ~1 min idle, 25 min on a loaded 2-core machine, where a 20-minute limit
# stopped it at 15 min and the retry made the demo's first train job FAILED): only the time-limit test meets one.
DEMO_RESOURCES = ("resources__gpus=1", "resources__train_mem_mb=3000", "resources__train_runtime=120")
# the plugin's job log: .snakemake/slurm_logs/rule_<rule>/[<wildcard values>/]<job id>.log
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: (\S+/rule_(\w+)/(?:\S+/)?\d+\.log)\)")


@dataclass
class Run:
    workdir: Path
    result: subprocess.CompletedProcess
    jobs: list[tuple[str, str, Path]]  # (rule, Slurm job id, job log) in submission order

    def job_ids(self, rule: str) -> list[str]:
        return [job for name, job, _ in self.jobs if name == rule]

    def record(self, rule: str, attempt: int = -1) -> dict[str, str]:
        ids = self.job_ids(rule)
        assert ids, f"no {rule} job was submitted: {[name for name, _, _ in self.jobs]}"
        return slurm_cluster.scontrol_job(ids[attempt])


def slurm_command(*args: str, timeout: int = RUN_TIMEOUT) -> tuple[list[str], dict]:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return ["timeout", "-k", "10", str(timeout), *SNAKEMAKE, "--profile", str(REPO / "profiles" / "slurm"),
            *NO_ACCOUNTING, *QUICK_POLLING, *args], env


def submitted(text: str) -> list[tuple[str, str, Path]]:
    return [(m.group(3), m.group(1), Path(m.group(2))) for m in SUBMITTED.finditer(text)]


def slurm_snakemake(workdir: Path, *args: str, timeout: int = RUN_TIMEOUT, check: bool = True) -> Run:
    cmd, env = slurm_command(*args, timeout=timeout)
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    text = result.stdout + result.stderr
    jobs = submitted(text)
    if check and result.returncode != 0:
        pytest.fail(f"snakemake --profile profiles/slurm {' '.join(args)} failed ({result.returncode}):\n"
                    f"{text[-8000:]}")
    return Run(workdir, result, jobs)


def copy_project(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("slurm_logs"))
    return dst


def gpu_request(record: dict[str, str]) -> str:
    """What the job asked for in GPUs, from its record ('' when nothing)."""
    fields = (record.get(k, "") for k in ("TresPerJob", "TresPerNode", "TresPerTask", "TRES", "Gres"))
    return ",".join(f for f in fields if "gpu" in f)


def job_log_resources(log: Path) -> str:
    """The `resources:` line that the job's own Snakemake wrote into the Slurm job log."""
    return next(line for line in log.read_text().splitlines() if line.strip().startswith("resources:"))


def metrics(workdir: Path, name: str) -> dict:
    return json.loads((workdir / "results" / "demo" / "metrics" / f"{name}.json").read_text())


@pytest.fixture(scope="session")
def slurm_demo(cluster, tmp_path_factory) -> Run:
    """The demo pipeline through profiles/slurm, one GPU for the GPU stages (a placeholder: training runs on the
    CPU, as preflight decides when torch sees no GPU)."""
    workdir = tmp_path_factory.mktemp("slurm-project")
    (workdir / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (workdir / "data").symlink_to(REPO / "data")
    return slurm_snakemake(workdir, "--config", *DEMO_RESOURCES)


def test_every_stage_ran_as_a_slurm_job(slurm_demo):
    assert sorted({rule for rule, _, _ in slurm_demo.jobs}) == sorted(CPU_STAGES + GPU_STAGES)
    run_dir = slurm_demo.workdir / "results" / "demo"
    for path in ("manifest.json", "adapters/adapter_model.safetensors", "merged/model.safetensors"):
        assert (run_dir / path).is_file(), path
    for rule, job, log in slurm_demo.jobs:
        record = slurm_cluster.scontrol_job(job)
        # the comment names the stage and its run (or shared stage's key): rule_train_wildcards_demo
        assert record["JobState"] == "COMPLETED" and record["Comment"].startswith(f"rule_{rule}_wildcards_"), record
        assert log.is_file(), f"{rule}: job log {log} missing"


def test_train_ran_on_the_gpu_partition_with_a_gpu(slurm_demo):
    record = slurm_demo.record("train")
    assert record["Partition"] == "gpu", record
    assert "gpu:1" in gpu_request(record), record
    train_log = next(log for rule, _, log in slurm_demo.jobs if rule == "train")
    assert re.search(r"\bgpu=1\b", job_log_resources(train_log)) and "slurm_partition=gpu" in job_log_resources(
        train_log)
    assert record["TimeLimit"] == "02:00:00" and "mem=3000M" in record["TRES"], record  # from config resources
    log = (slurm_demo.workdir / "results" / "demo" / "logs" / "train.log").read_text()
    # The process count came from the allocation, which holds one placeholder GPU; torch saw no GPU: CPU training.
    assert "1 process(es) per node (SLURM_GPUS_ON_NODE)" in log and "CUDA_VISIBLE_DEVICES='0'" in log, log[:2000]
    train = metrics(slurm_demo.workdir, "train")
    assert train["device"] == "cpu" and train["world_size"] == 1
    assert train["adapter_max_abs_change"] > 0 and train["train_loss_last"] < train["train_loss_first"]


def test_the_other_gpu_stages_went_to_the_gpu_partition(slurm_demo):
    for rule in ("preflight", "merge", "evaluate"):
        record = slurm_demo.record(rule)
        assert record["Partition"] == "gpu" and "gpu:1" in gpu_request(record), (rule, record)


def test_the_cpu_stages_asked_for_no_gpu(slurm_demo):
    for rule in CPU_STAGES:
        record = slurm_demo.record(rule)
        assert record["Partition"] == "cpu", (rule, record)
        assert gpu_request(record) == "", (rule, record)
        log = next(log for name, _, log in slurm_demo.jobs if name == rule)
        assert not re.search(r"\bgpus?=", job_log_resources(log)), (rule, job_log_resources(log))


def test_a_hyperparameter_change_plans_only_the_downstream_jobs(slurm_demo):
    dry = slurm_snakemake(slurm_demo.workdir, "--dry-run", "--config", *DEMO_RESOURCES,
                          "training__learning_rate=0.005")
    assert planned_jobs(dry.result) == {"train", "merge", "evaluate", "summary", "plots", "all"}
    again = slurm_snakemake(slurm_demo.workdir, "--dry-run", "--config", *DEMO_RESOURCES)
    assert "Nothing to be done" in again.result.stdout + again.result.stderr


def test_snakemake_profile_slurm_works_as_written_after_make_install_profile(cluster, tmp_path):
    """`snakemake --profile slurm` (the name, from the project directory) after `make install-profile`, which
    links the repository's profiles where Snakemake looks names up ($XDG_CONFIG_HOME/snakemake); without it the
    name is unknown."""
    config_home = tmp_path / "config"
    env = os.environ | {"XDG_CONFIG_HOME": str(config_home),
                        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["timeout", "-k", "10", "300", *SNAKEMAKE, "--profile", "slurm", *NO_ACCOUNTING, "--dry-run",
           "--config", *DEMO_RESOURCES]
    workdir = fresh_project(tmp_path / "project")
    before = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    assert before.returncode != 0 and "slurm" in before.stderr, before.stderr[-2000:]
    subprocess.run(["make", "-s", "-C", str(REPO), "install-profile"], env=env, check=True, capture_output=True)
    assert (config_home / "snakemake" / "slurm").resolve() == REPO / "profiles" / "slurm"
    dry = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert planned_jobs(dry) == {"build_demo_model", "model", "prepare_data", "preflight", "train", "merge",
                                 "evaluate", "plots", "summary", "all"}
    assert "slurm" in (dry.stdout + dry.stderr).lower()
    # idempotent, and a real directory of that name is left alone
    subprocess.run(["make", "-s", "-C", str(REPO), "install-profile"], env=env, check=True, capture_output=True)
    (config_home / "snakemake" / "slurm").unlink()
    (config_home / "snakemake" / "slurm").mkdir()
    refused = subprocess.run(["make", "-s", "-C", str(REPO), "install-profile"], env=env, capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "is not a link: left alone" in refused.stdout + refused.stderr


def test_without_job_accounting_the_run_stops_at_start_with_the_flag_to_add(cluster, tmp_path):
    """This cluster has no accounting, so sacct fails: without `--slurm-status-command squeue` the executor would
    submit the first job and wait for its status forever. The workflow says so when it starts and submits
    nothing; the dry run (which submits nothing either) still plans."""
    workdir = fresh_project(tmp_path / "project")
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["timeout", "-k", "10", "300", *SNAKEMAKE, "--profile", str(REPO / "profiles" / "slurm"), *QUICK_POLLING,
           "--config", *DEMO_RESOURCES]
    assert subprocess.run(["sacct", "-X", "-n"], capture_output=True).returncode != 0  # the premise
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    text = result.stdout + result.stderr
    assert result.returncode not in (0, 124, 137), text[-4000:]
    assert "Slurm job accounting does not answer on this cluster" in text and "sacct" in text, text[-4000:]
    assert "Add `--slurm-status-command squeue`" in text and "Nothing was submitted" in text
    assert submitted(text) == [] and not (workdir / "results").exists(), text[-4000:]
    assert not (workdir / ".snakemake" / "locks").is_dir() or not any((workdir / ".snakemake" / "locks").iterdir())
    dry = subprocess.run([*cmd, "--dry-run"], cwd=workdir, env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and "train" in planned_jobs(dry), dry.stderr[-3000:]


def test_the_cluster_puts_back_the_configuration_it_found(cluster, tmp_path, monkeypatch):
    """What the cluster fixture does on teardown: slurm.conf and gres.conf as they were before it wrote them
    (absent, or another program's); one an earlier test session left behind is removed."""
    conf, gres = tmp_path / "slurm.conf", tmp_path / "gres.conf"
    monkeypatch.setattr(slurm_cluster, "SLURM_CONF", conf)
    monkeypatch.setattr(slurm_cluster, "GRES_CONF", gres)
    probe = slurm_cluster.Cluster(host=cluster.host, cpus=cluster.cpus, memory_mb=cluster.memory_mb)
    gres.write_text("# the site's own\n")
    probe.write_config()
    assert slurm_cluster.MARKER in conf.read_text() and slurm_cluster.MARKER in gres.read_text()
    probe.restore_config()
    assert not conf.exists() and gres.read_text() == "# the site's own\n"
    conf.write_text(f"{slurm_cluster.MARKER}\nleft by a killed session\n")
    gres.unlink()
    probe.write_config()
    probe.restore_config()
    assert not conf.exists() and not gres.exists()


def test_two_processes_in_one_slurm_job(slurm_demo, tmp_path):
    """Two GPUs allocated -> two training processes (torchrun, gloo on the CPU) in one job; the adapter they
    produce merges and reloads like a single-process one. Only the jobs after the change are submitted."""
    workdir = copy_project(slurm_demo.workdir, tmp_path / "project")
    run = slurm_snakemake(workdir, "--config", *DEMO_RESOURCES, "resources__gpus=2", "training__max_steps=12",
                          "training__eval_steps=6", "training__save_steps=6", "evaluate__enabled=false")
    # preflight again: it chooses the strategy for the job's GPUs (two now: ddp)
    rules = [rule for rule, _, _ in run.jobs]
    assert rules[:3] == ["preflight", "train", "merge"] and sorted(rules[3:]) == ["plots", "summary"], rules
    assert json.loads((workdir / "results" / "demo" / "preflight.json").read_text())["strategy"]["chosen"] == "ddp"
    record = run.record("train")
    assert record["Partition"] == "gpu" and "gpu:2" in gpu_request(record), record
    log = (workdir / "results" / "demo" / "logs" / "train.log").read_text()
    assert "2 process(es) per node (SLURM_GPUS_ON_NODE)" in log and "torch.distributed.run" in log, log[:3000]
    train = metrics(workdir, "train")
    assert train["world_size"] == 2 and train["steps"] == 12 and train["adapter_max_abs_change"] > 0
    env = dict(line.split("=", 1) for line in (workdir / "results" / "demo" / "training.env").read_text().splitlines()
               if "=" in line and not line.startswith("#"))
    micro, accumulation = int(env["TRAINING_MICRO_BATCH_SIZE"]), int(env["TRAINING_GRADIENT_ACCUMULATION"])
    assert train["effective_batch_size"] == micro * accumulation * 2
    assert re.search(rf"effective batch\s+{micro * accumulation * 2} = micro batch {micro} x gradient accumulation "
                     rf"{accumulation} x world size 2", log), log[:3000]
    merge = metrics(workdir, "merge")
    assert merge["max_abs_logit_diff"] <= 1e-3, merge
    assert (workdir / "results" / "demo" / "merged" / "model.safetensors").is_file()


def test_the_train_jobs_of_an_experiments_runs_are_in_the_queue_at_the_same_time(cluster, tmp_path):
    """An experiment of two runs (README, "Experiments"): each run's train job is submitted as soon as its inputs
    exist, not after the other run's: both are in Slurm's queue at once (submitted before either ended)."""
    workdir = fresh_project(tmp_path / "experiment")
    with open(workdir / "config.yaml", "a") as fh:
        fh.write("sweep:\n  training.learning_rate: [0.005, 0.05]\ntraining:\n  max_steps: 4\n"
                 "  eval_steps: 2\n  save_steps: 4\n")
    run = slurm_snakemake(workdir, "results/lr5e-3/metrics/train.json", "results/lr0.05/metrics/train.json",
                          "--config", *DEMO_RESOURCES)
    assert [rule for rule, _, _ in run.jobs].count("build_demo_model") == 1  # the shared stages once
    records = [slurm_cluster.scontrol_job(job) for job in run.job_ids("train")]
    assert len(records) == 2, [rule for rule, _, _ in run.jobs]
    assert max(r["SubmitTime"] for r in records) < min(r["EndTime"] for r in records), records


def trainer_pid(workdir: Path) -> int | None:
    """The train stage's process (scripts/train.py) of the job running in workdir; None when there is none."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if len(argv) > 1 and argv[1].endswith(b"scripts/train.py") and (proc / "cwd").resolve() == workdir:
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def wait_for(what: str, done, controller: subprocess.Popen, output: Path, timeout: float = 600) -> None:
    """Poll done() until it holds; fail (with the run's output) when the controller ends first or after timeout."""
    import time

    deadline = time.monotonic() + timeout
    while not done():
        if controller.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen:\n{output.read_text()[-6000:]}")
        time.sleep(0.1)


def test_a_job_that_hits_its_time_limit_is_resumed_from_its_checkpoint(slurm_demo, tmp_path):
    """A 2-minute train job that has to stop 60 s before its limit: it saves a checkpoint and fails; the retry
    (1.5x time and memory) resumes from that checkpoint and does only the steps that were left.

    Driven by events, not by how fast this machine trains: once training has made a step, the trainer is paused
    (SIGSTOP) until the launcher has announced that the time limit is near, so the first job cannot finish early
    on a fast machine; a slow one only makes the pause shorter."""
    import signal

    max_steps = 40
    workdir = copy_project(slurm_demo.workdir, tmp_path / "project").resolve()
    train_log = workdir / "results" / "demo" / "logs" / "train.log"
    output = tmp_path / "snakemake.out"
    cmd, env = slurm_command("--retries", "3", "--config", *DEMO_RESOURCES, "resources__train_runtime=2",
                             "resources__train_stop_before=60", f"training__max_steps={max_steps}",
                             "training__eval_steps=1000", "training__save_steps=1000", "training__logging_steps=1")

    def log_text() -> str:
        return train_log.read_text() if train_log.is_file() else ""

    with open(output, "w") as sink:
        controller = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for("a training step", lambda: re.search(rf"(?<!eval )step \d+/{max_steps} ", log_text()),
                     controller, output, timeout=RUN_TIMEOUT)
            pid = trainer_pid(workdir)  # None: the signal came first and the trainer has already stopped
            if pid:
                os.kill(pid, signal.SIGSTOP)
            try:
                wait_for("the launcher's stop before the time limit", lambda: "time limit is near" in log_text(),
                         controller, output, timeout=300)
            finally:
                if pid:
                    os.kill(pid, signal.SIGCONT)
            assert controller.wait(RUN_TIMEOUT) == 0, output.read_text()[-8000:]
        finally:
            if controller.poll() is None:
                controller.kill()
    text = output.read_text()
    run = Run(workdir, subprocess.CompletedProcess(cmd, 0, text, ""), submitted(text))
    rules = [rule for rule, _, _ in run.jobs]
    assert rules[-4:-2] == ["merge", "evaluate"] and sorted(rules[-2:]) == ["plots", "summary"], rules
    assert set(rules[:-4]) == {"train"} and len(run.job_ids("train")) >= 2, rules

    first = run.record("train", 0)
    assert first["JobState"] == "FAILED" and first["TimeLimit"] == "00:02:00" and "mem=3000M" in first["TRES"], first
    # show-failed-logs: the failed attempt's train.log
    assert re.search(r"stopped by SIGUSR1 at step \d+", text) and "time limit is near" in text, text[-6000:]
    assert next(log for rule, _, log in run.jobs if rule == "train").is_file()  # the first attempt's job log
    last = run.record("train")
    assert last["JobState"] == "COMPLETED", last
    assert last["TimeLimit"] != "00:02:00" and "mem=3000M" not in last["TRES"], last  # the retry got more

    train = metrics(workdir, "train")
    resumed_at = int(train["resumed_from"].rsplit("-", 1)[1])
    assert 0 < resumed_at < max_steps and train["steps"] == max_steps  # a fresh run would have started at 0
    assert f"resuming from checkpoint-{resumed_at}" in log_text(), log_text()[:3000]


def fresh_project(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (path / "data").symlink_to(REPO / "data")
    return path


def scancel_train_mid_run(cmd: list[str], env: dict, workdir: Path, output: Path, max_steps: int, ready,
                          what: str, start_timeout: int = 600, finish_timeout: int = 900) -> list[str]:
    """Run Snakemake (cmd) in workdir until the train log's last step satisfies ready(step), scancel the train
    job there (what a time limit, an admin or preemption does), and wait for the workflow to finish (the retry);
    returns the train jobs' ids."""
    import time

    train_log = workdir / "results" / "demo" / "logs" / "train.log"
    with open(output, "w") as sink:
        controller = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout
            while time.monotonic() < deadline and controller.poll() is None:
                steps = [int(n) for n in re.findall(rf"(?<!eval )step (\d+)/{max_steps} ",
                                                    train_log.read_text() if train_log.is_file() else "")]
                if steps and ready(steps[-1]):
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"training never got {what}:\n{output.read_text()[-4000:]}")
            job = next(job for rule, job, _ in submitted(output.read_text()) if rule == "train")
            subprocess.run(["scancel", job], check=True)
            assert controller.wait(finish_timeout) == 0, output.read_text()[-8000:]
        finally:
            if controller.poll() is None:
                controller.kill()
    return [job for rule, job, _ in submitted(output.read_text()) if rule == "train"]


def test_fsdp_on_two_gpus_is_cancelled_resumes_and_merges(cluster, tmp_path):
    """training.strategy fsdp with resources.gpus 2 (two processes, gloo on the CPU; plain LoRA: 4-bit does not
    run sharded on the CPU), from a fresh project: preflight chooses fsdp, the train job is cancelled mid-training
    (scancel: what a time limit or preemption does), writes a sharded checkpoint, and the retry resumes under FSDP
    from it, finishes, and the adapter merges. Nothing in the profile changes: only the config's keys. Its own
    project (not the demo's copy), so that it needs no demo run first."""

    max_steps = 60
    workdir = fresh_project(tmp_path / "project")
    run_dir = workdir / "results" / "demo"
    train_log = run_dir / "logs" / "train.log"
    output = tmp_path / "snakemake.out"
    cmd, env = slurm_command("--config", *DEMO_RESOURCES, "resources__gpus=2", "training__strategy=fsdp",
                             "training__quantization=none", f"training__max_steps={max_steps}",
                             "training__eval_steps=1000", "training__save_steps=1000", "training__logging_steps=5",
                             "evaluate__enabled=false")
    jobs = scancel_train_mid_run(cmd, env, workdir, output, max_steps, lambda step: 5 <= step < max_steps - 10,
                                 "to step 5", start_timeout=1200, finish_timeout=1200)
    text = output.read_text()
    assert len(jobs) == 2, text[-6000:]
    assert slurm_cluster.scontrol_job(jobs[0])["JobState"] == "CANCELLED"
    assert "gpu:2" in gpu_request(slurm_cluster.scontrol_job(jobs[1]))
    assert json.loads((run_dir / "preflight.json").read_text())["strategy"]["chosen"] == "fsdp"
    train = metrics(workdir, "train")
    resumed_at = int(train["resumed_from"].rsplit("-", 1)[1])
    assert 5 <= resumed_at < max_steps and train["steps"] == max_steps
    assert train["strategy"] == "fsdp" and train["world_size"] == 2
    assert (workdir / train["resumed_from"] / "pytorch_model_fsdp_0" / ".metadata").is_file()  # sharded by FSDP
    log = train_log.read_text()
    assert f"resuming from checkpoint-{resumed_at}" in log and "strategy fsdp" in log, log[:3000]
    assert "2 process(es) per node (SLURM_GPUS_ON_NODE)" in log
    assert metrics(workdir, "merge")["max_abs_logit_diff"] <= 1e-3
    assert (run_dir / "merged" / "model.safetensors").is_file()


def test_a_train_job_cancelled_with_scancel_is_resumed_by_the_retry(slurm_demo, tmp_path):
    """scancel of the running train job (what an admin, a user or preemption does): Slurm sends SIGTERM, the
    trainer saves a checkpoint at the end of its step and the job ends CANCELLED; Snakemake's retry resumes from
    that checkpoint (not the last periodic one) and the run completes."""

    max_steps, save_steps = 300, 50
    workdir = copy_project(slurm_demo.workdir, tmp_path / "project")
    shutil.rmtree(workdir / "results" / "demo" / "checkpoints")
    train_log = workdir / "results" / "demo" / "logs" / "train.log"
    output = tmp_path / "snakemake.out"
    cmd, env = slurm_command("--config", *DEMO_RESOURCES, f"training__max_steps={max_steps}",
                             f"training__save_steps={save_steps}", f"training__eval_steps={save_steps}",
                             "training__logging_steps=5")
    jobs = scancel_train_mid_run(cmd, env, workdir, output, max_steps,
                                 lambda step: save_steps < step < 2 * save_steps - 10, f"past step {save_steps}")
    text = output.read_text()
    assert len(jobs) == 2, text[-6000:]
    assert slurm_cluster.scontrol_job(jobs[0])["JobState"] == "CANCELLED"
    assert slurm_cluster.scontrol_job(jobs[1])["JobState"] == "COMPLETED"
    assert re.search(r"SIGTERM received|stopped by SIG(TERM|USR1) at step \d+", text), text[-6000:]
    train = metrics(workdir, "train")
    resumed_at = int(train["resumed_from"].rsplit("-", 1)[1])
    assert save_steps < resumed_at < max_steps and train["steps"] == max_steps  # the checkpoint scancel made
    assert f"resuming from checkpoint-{resumed_at}" in train_log.read_text()


# --- the launcher: processes from the allocation, one launcher per node through srun ----------------------------

PROBE = """
import json, os, sys
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
out = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_STEP_ID")}
out["sum"] = total.item()
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as fh:
    json.dump(out, fh)
dist.destroy_process_group()
"""


def test_processes_per_node_come_from_the_allocation():
    import launch

    assert launch.processes_per_node(2, 0, {"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1"}) == (
        4, "SLURM_GPUS_ON_NODE")
    assert launch.processes_per_node(2, 0, {"CUDA_VISIBLE_DEVICES": "0,1,2"})[0] == 3
    assert launch.processes_per_node(2, 0, {"CUDA_VISIBLE_DEVICES": "NoDevFiles"})[0] == 2  # outside Slurm
    assert launch.processes_per_node(0, 0, {"SLURM_GPUS_ON_NODE": "4"})[0] == 1  # no GPUs asked: one process
    assert launch.processes_per_node(1, 2, {"SLURM_GPUS_ON_NODE": "1"}) == (2, "resources.processes_per_node")


def test_several_nodes_start_one_launcher_per_node_with_rendezvous_on_the_first(monkeypatch):
    import launch

    monkeypatch.setattr(launch, "first_node", lambda env: "gpu017")
    cmd = launch.command(["train.py", "--x", "1"], 4, 2, 29500, {"SLURM_JOB_ID": "4242"})
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert cmd[-3:] == ["train.py", "--x", "1"]
    for part in ("--nproc-per-node=4", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu017:29500",
                 "--rdzv-id=4242"):
        assert part in cmd, (part, cmd)
    assert launch.command(["train.py"], 2, 1, 29500, {})[-2:] == ["--standalone", "train.py"]
    assert launch.command(["train.py"], 1, 1, 29500, {}) == [sys.executable, "train.py"]


def test_the_container_prefix_goes_after_srun_and_the_image_python_runs_the_trainer(monkeypatch):
    import launch

    monkeypatch.setattr(launch, "first_node", lambda env: "gpu017")
    image = ["apptainer", "exec", "--nv", "/images/finetune.sif"]
    cmd = launch.command(["train.py"], 4, 2, 29500, {"SLURM_JOB_ID": "7"}, image=image)
    assert cmd[0] == "srun" and cmd[cmd.index("apptainer"):][:4] == image  # srun is on the host, not in the image
    inner = cmd[cmd.index("/images/finetune.sif") + 1:]
    assert inner[:4] == ["python", launch.__file__, "--exec-ignoring-stop-signals", "--"]
    assert inner[4:7] == ["python", "-m", "torch.distributed.run"] and sys.executable not in cmd
    assert launch.command(["train.py"], 1, 1, 29500, {}, image=image) == [*image, "python", "train.py"]
    assert launch.command(["train.py"], 2, 1, 29500, {}, image=image)[:7] == [
        *image, "python", "-m", "torch.distributed.run"]


def launcher_job(tmp_path: Path, program: str, mem_mb: int, port: int, stop_before: int, args: str = "",
                 launch_args: str = "", env: dict | None = None):
    """An sbatch job (2 GPUs, 5 minutes) that runs launch.py's multi-node path (srun) on `program` (source, or a
    path); returns the sbatch result and the job's log."""
    if "\n" in program:
        (tmp_path / "program.py").write_text(program)
        program = str(tmp_path / "program.py")
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"} | (env or {})
    result = subprocess.run(
        ["sbatch", "--wait", "-p", "gpu", "--gpus=2", "-c", "2", f"--mem={mem_mb}", "-t", "5",
         "-o", str(tmp_path / "job.log"),
         "--wrap", f"{sys.executable} {REPO / 'scripts' / 'launch.py'} --gpus 2 --srun --port {port} "
                   f"--stop-before {stop_before} {launch_args} -- {program} {args or tmp_path}"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    log = (tmp_path / "job.log").read_text() if (tmp_path / "job.log").exists() else ""
    return result, log


def test_the_srun_launcher_path_rendezvous_in_a_slurm_job(cluster, tmp_path):
    """What nodes > 1 does (srun, one torchrun per node, c10d rendezvous on the job's first node), on the one node
    this machine has: two GPUs allocated -> two ranks that find each other and all-reduce."""
    result, log = launcher_job(tmp_path, PROBE, mem_mb=2000, port=29555, stop_before=0)
    assert result.returncode == 0, result.stderr + log
    assert "2 process(es) per node (SLURM_GPUS_ON_NODE)" in log and "--rdzv-backend=c10d" in log, log
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["WORLD_SIZE"] for r in ranks] == ["2", "2"] and {r["sum"] for r in ranks} == {3.0}
    assert all(r["SLURM_STEP_ID"] is not None for r in ranks)  # they ran inside the srun job step


def test_fsdp_training_through_the_multi_node_command_line_in_a_slurm_job(cluster, tiny_model, tmp_path):
    """The train stage under FSDP started the way several nodes start it (srun, one torchrun per node, c10d
    rendezvous), on this cluster's one node with two GPUs allocated: the launcher reads the strategy from the
    preflight report, both ranks train the same sharded model, and the adapter is saved once."""
    from support import distributed_train

    preflight = tmp_path / "preflight.json"
    preflight.write_text(json.dumps({"device": "cpu", "bf16": False, "strategy": {
        "requested": "fsdp", "chosen": "fsdp", "why": "as configured", "world_size": 2}}))
    overrides = json.dumps({"strategy": "fsdp", "quantization": "none", "micro_batch_size": 4})
    result, log = launcher_job(
        tmp_path, distributed_train.__file__, mem_mb=4000, port=29557, stop_before=0,
        args=f"{tiny_model} {tmp_path / 'run'} {shlex.quote(overrides)}", launch_args=f"--preflight {preflight}",
        env={"PYTHONPATH": f"{REPO / 'scripts'}:{REPO / 'tests'}"})
    assert result.returncode == 0, result.stderr + log[-6000:]
    assert "world size 2; strategy fsdp" in log and "--rdzv-backend=c10d" in log, log
    train = json.loads((tmp_path / "run" / "metrics" / "train.json").read_text())
    assert train["strategy"] == "fsdp" and train["world_size"] == 2 and train["steps"] == 8
    assert next((tmp_path / "run" / "checkpoints").glob("*/checkpoint-8/pytorch_model_fsdp_0/__1_0.distcp"))
    assert (tmp_path / "run" / "adapters" / "adapter_model.safetensors").is_file()


def test_retries_scale_memory_and_time_and_several_nodes_ask_for_gpus_per_node():
    from hpc_finetune.workflow.config import resolve_config
    from hpc_finetune.workflow.slurm import scaled, train_placement

    cfg = resolve_config({"run_name": "x", "resources": {"gpus": 4, "train_mem_mb": 1000}})
    grow = scaled(cfg, cfg["resources"]["train_mem_mb"])
    assert [grow({}, attempt) for attempt in (1, 2, 3)] == [1000, 1500, 2250]
    assert train_placement(cfg) == {"gpu": 4}
    cfg["resources"]["nodes"] = 2
    assert train_placement(cfg) == {"nodes": 2, "mpi": "srun", "tasks": 2, "tasks_per_gpu": 0, "gres": "gpu:4"}


STOPPABLE = """
import os, signal, sys, time
def stop(signum, frame):
    open(os.path.join(sys.argv[1], f"stopped{os.environ['RANK']}"), "w").write(signal.Signals(signum).name)
    sys.exit(2)
signal.signal(signal.SIGUSR1, stop)
time.sleep(120)
"""


def test_the_srun_launcher_path_stops_every_rank_before_the_time_limit(cluster, tmp_path):
    """Near the time limit the launcher's SIGUSR1 goes through srun to every process of the step: each rank (here
    a stand-in for the trainer) gets it, torchrun itself ignores it and reports the ranks' exit."""
    result, log = launcher_job(tmp_path, STOPPABLE, mem_mb=1000, port=29556, stop_before=285)
    assert result.returncode != 0 and "time limit is near" in log, log
    assert [(tmp_path / f"stopped{r}").read_text() for r in (0, 1)] == ["SIGUSR1", "SIGUSR1"], log
