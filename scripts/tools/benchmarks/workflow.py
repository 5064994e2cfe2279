"""`bench.py workflow`: on a completed run, the wall and CPU time of a dry-run and of a no-op re-run, next to
Snakemake's own start-up, and the Slurm executor plugin's import-time probe. With --runs N...: the wall time of
planning (a dry run from nothing) an experiment of N runs (a sweep over training.seed) in a fresh project each."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hpc_finetune.io.cli import table
from hpc_finetune.io.files import write_json
from tools.benchmarks.models import REPO


def slurm_probe_s() -> float | None:
    """How long the Slurm executor plugin's import-time probe (`scontrol show config`, 10 s timeout) takes here;
    None where Slurm is not installed and the plugin skips it."""
    if not shutil.which("sinfo") or not shutil.which("scontrol"):
        return None
    start = time.perf_counter()
    try:
        subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        pass
    return time.perf_counter() - start


def timed(command: list[str], cwd: str | Path) -> tuple[float, float, str, int]:
    """Wall and CPU seconds, output and exit code of a command."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime, output, os.waitstatus_to_exitcode(status)


def bench_runs(args) -> dict:
    """Dry-run wall time of an experiment of N runs, for each N of args.runs (median of args.repeats), each in a
    project of its own under args.work: the cost of planning many runs (README, "Experiments")."""
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    profile = str(Path(args.profile).resolve() if Path(args.profile).is_dir() else REPO / args.profile)
    rows, report = [], {"benchmark": "workflow-runs", "repeats": args.repeats, "runs": {}}
    for n in args.runs:
        project = Path(args.work) / f"experiment-{n}"
        shutil.rmtree(project, ignore_errors=True)
        project.mkdir(parents=True)
        (project / "data").symlink_to(REPO / "data")
        seeds = ", ".join(map(str, range(n)))
        (project / "config.yaml").write_text((REPO / "config.yaml").read_text()
                                             + f"sweep:\n  training.seed: [{seeds}]\nexperiment:\n  max_runs: {n}\n")
        command = [snakemake, "-s", str(REPO / "Snakefile"), "--profile", profile, "-n", *args.snakemake_args]
        wall, cpu = [], []
        for _ in range(args.repeats):
            w, c, output, code = timed(command, project)
            if code != 0:
                raise SystemExit(f"the dry run of {n} runs failed:\n{output[-3000:]}")
            wall.append(w)
            cpu.append(c)
        jobs = int(output.split("Job stats:", 1)[1].split("total", 1)[1].split()[0])
        report["runs"][n] = {"jobs": jobs, "dry_run_s": statistics.median(wall), "dry_run_cpu_s": statistics.median(cpu),
                             "wall_s": wall}
        rows.append((f"{n} runs ({jobs} jobs)", f"{statistics.median(wall):.2f} s wall, {statistics.median(cpu):.2f} s CPU"))
    report |= {"load_average": os.getloadavg(), "cores": os.cpu_count(), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(table(rows, f"planning an experiment: dry run from nothing (median of {args.repeats}; load average "
                      f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"))
    write_json(args.out, report)
    return report


def bench_workflow(args) -> dict:
    """Wall and CPU time of a dry-run and of a no-op re-run of a completed run (median of `repeats`), next to
    Snakemake's own start-up (`snakemake --version`), which no workflow can go below."""
    if args.runs:
        return bench_runs(args)
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    profile = str(Path(args.profile).resolve() if Path(args.profile).is_dir() else REPO / args.profile)
    base = [snakemake, "-s", str(REPO / "Snakefile"), "--profile", profile, "--directory", args.directory,
            *args.snakemake_args]
    runs = {"startup": [snakemake, "--version"], "dry_run": [*base, "-n"], "noop_rerun": base}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, command in runs.items():
            w, c, output, code = timed(command, args.directory)
            wall[name].append(w)
            cpu[name].append(c)
            if code != 0:
                raise SystemExit(f"{name} failed:\n{output}")
            if name != "startup" and "Nothing to be done" not in output:
                raise SystemExit(f"the run in {args.directory} is not complete: snakemake has work to do\n{output}")
    report = {"benchmark": "workflow", "directory": str(Path(args.directory).resolve()), "repeats": args.repeats,
              **{f"{k}_s": statistics.median(v) for k, v in wall.items()}, "slurm_probe_s": slurm_probe_s(),
              **{f"{k}_cpu_s": statistics.median(v) for k, v in cpu.items()}, "wall_s": wall, "cpu_s": cpu,
              "load_average": os.getloadavg(), "cores": os.cpu_count(),
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(table([(label, f"{report[name + '_s']:.2f} s wall, {report[name + '_cpu_s']:.2f} s CPU") for name, label in (
        ("dry_run", "dry-run (snakemake -n)"), ("noop_rerun", "no-op re-run"),
        ("startup", "snakemake --version alone"))],
        f"workflow overhead (median of {args.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"))
    if (report["slurm_probe_s"] or 0) > 1:
        print(f"note: Slurm is installed but `scontrol show config` took {report['slurm_probe_s']:.1f} s (no controller "
              "answers?). The Slurm executor plugin runs it on every snakemake start, so each figure above includes it.")
    write_json(args.out, report)
    return report
