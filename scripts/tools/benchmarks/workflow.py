"""`bench.py workflow`: on a completed run, the wall and CPU time of a dry-run and of a no-op re-run, next to
Snakemake's own start-up, and the Slurm executor plugin's import-time probe."""

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


def bench_workflow(args) -> dict:
    """Wall and CPU time of a dry-run and of a no-op re-run of a completed run (median of `repeats`), next to
    Snakemake's own start-up (`snakemake --version`), which no workflow can go below."""
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    profile = str(Path(args.profile).resolve() if Path(args.profile).is_dir() else REPO / args.profile)
    base = [snakemake, "-s", str(REPO / "Snakefile"), "--profile", profile, "--directory", args.directory,
            *args.snakemake_args]
    runs = {"startup": [snakemake, "--version"], "dry_run": [*base, "-n"], "noop_rerun": base}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, command in runs.items():
            start = time.perf_counter()
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=args.directory)
            output = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(usage.ru_utime + usage.ru_stime)
            if os.waitstatus_to_exitcode(status) != 0:
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
