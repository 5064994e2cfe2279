"""Start the training script with as many processes as the job was given GPUs.

    python scripts/launch.py --gpus 2 [--processes 0] [--nodes 1] [--port 29500] -- scripts/train.py --arg ...

Processes per node: `--processes` when above 0 (a config override, e.g. to test two processes on a CPU), else the
GPUs that Slurm allocated to this job on this node (SLURM_GPUS_ON_NODE, then the count in CUDA_VISIBLE_DEVICES),
else `--gpus` (outside Slurm); 1 when `--gpus` is 0. A visible device is no proof of a usable GPU: the trainer
decides the device from the preflight report and falls back to gloo on the CPU.

- 1 process, 1 node: `python train.py` (torchrun with one process when the strategy shards: FSDP and DeepSpeed
  need a process group).
- N processes, 1 node: `torchrun --standalone --nproc-per-node N` (NCCL on GPUs, gloo on the CPU).
- M nodes (`--nodes` > 1, inside a Slurm job with M nodes): `srun --nodes M --ntasks-per-node 1` starts one
  torchrun per node, with the c10d rendezvous on the job's first node (`--port`), rendezvous id the job id.

The strategy (training.strategy, as preflight resolved it: single, ddp, fsdp, deepspeed) reaches every process on
every node the same way: each trainer reads it from the preflight report (`--preflight`, the file the trainer is
given too) on the shared file system; torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR) tells Accelerate the
world. The launcher reads it to log it and to pick the one-process form.

The launcher itself runs on the host (no heavy imports): srun and squeue are there, not in the image. With
`--in-image PREFIX` it starts the trainer, torchrun or each node's part through PREFIX (after srun).

Time limits: inside a Slurm job the launcher reads the job's end time (squeue) and, `--stop-before` seconds
before it, asks the workers to checkpoint and stop; the next run resumes from that checkpoint.
SIGTERM/SIGUSR1 sent to the launcher reach the workers as SIGUSR1: they save a checkpoint and exit 2; the launcher
exits with their status (see run()).

One run at a time: with `--lock PATH` (the rule passes the run's checkpoint directory) the launcher holds an
exclusive lock for as long as the trainers run (they inherit it). A second train job of the same run, started
while the first still goes (the controller was killed and restarted, a job was resubmitted), waits for it instead
of writing the same checkpoints and adapter; it then resumes from, or takes, what the first one saved.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

from hpc_finetune.io.cli import setup_logging
from hpc_finetune.io.files import locked

STOP = (signal.SIGTERM, signal.SIGUSR1)


def visible_devices(value: str | None) -> int:
    """Devices listed in CUDA_VISIBLE_DEVICES; 0 for unset, empty, "-1" or Slurm's "NoDevFiles"."""
    if not value or value.strip() in ("-1", "NoDevFiles"):
        return 0
    return len([d for d in value.split(",") if d.strip()])


def processes_per_node(requested_gpus: int, override: int, env: Mapping[str, str]) -> tuple[int, str]:
    """(processes, where the number came from)."""
    if override > 0:
        return override, "resources.processes_per_node"
    if requested_gpus <= 0:
        return 1, "no GPUs requested"
    on_node = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if on_node.isdigit() and int(on_node) > 0:
        return int(on_node), "SLURM_GPUS_ON_NODE"
    if visible_devices(env.get("CUDA_VISIBLE_DEVICES")):
        return visible_devices(env.get("CUDA_VISIBLE_DEVICES")), "CUDA_VISIBLE_DEVICES"
    return requested_gpus, "resources.gpus (no allocation in the environment)"


def first_node(env: Mapping[str, str]) -> str:
    """The first host of the job's allocation (the rendezvous host)."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist and env.get("SLURM_JOB_ID"):  # Snakemake's job step keeps only the job id
        nodelist = subprocess.run(["squeue", "-h", "-j", env["SLURM_JOB_ID"], "-o", "%N"], capture_output=True,
                                  text=True, check=True).stdout.strip()
    if not nodelist:
        raise SystemExit("launch.py: --nodes > 1 needs a Slurm allocation (SLURM_JOB_ID is not set)")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


SHARDED = ("fsdp", "deepspeed")


def planned_strategy(preflight: str) -> str:
    """The strategy preflight chose for the train job ('' without a report or a choice)."""
    if not preflight or not os.path.isfile(preflight):
        return ""
    with open(preflight) as fh:
        return (json.load(fh).get("strategy") or {}).get("chosen", "")


def command(script: list[str], processes: int, nodes: int, port: int, env: Mapping[str, str],
            srun: bool = False, image: list[str] = (), strategy: str = "") -> list[str]:
    """The command line that starts `script` (the trainer and its arguments). srun: the multi-node form even for
    one node (tests exercise the srun + rendezvous path on one machine with it). image: the container runtime's
    prefix (`apptainer exec ... finetune.sif`); it goes after srun, which exists on the host only, and the
    image's own `python` runs the trainer."""
    python = "python" if image else sys.executable
    srun = srun or nodes > 1
    if not srun and processes <= 1 and strategy not in SHARDED:
        return [*image, python, *script]
    torchrun = [python, "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
    if not srun:
        return [*image, *torchrun, "--standalone", *script]
    job = env.get("SLURM_JOB_ID", "finetune")
    rendezvous = [f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={first_node(env)}:{port}",
                  f"--rdzv-id={job}", "--max-restarts=0"]
    srun = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    # On each node torchrun starts with the stop signals ignored, as here (srun does not pass that on): srun
    # forwards the launcher's SIGUSR1 to every process of the step, and only the trainers act on it.
    ignoring = [python, os.path.abspath(__file__), "--exec-ignoring-stop-signals", "--"]
    return [*srun, *image, *ignoring, *torchrun, *rendezvous, *script]


def job_end_time(env: Mapping[str, str]) -> float | None:
    """When Slurm ends this job (its time limit), as a Unix time; None outside Slurm or without a limit."""
    job = env.get("SLURM_JOB_ID")
    if not job or not shutil.which("squeue"):
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=60)
        return time.mktime(time.strptime(out.stdout.strip(), "%Y-%m-%dT%H:%M:%S"))
    except (subprocess.SubprocessError, OSError, ValueError):
        return None


def run(cmd: list[str], deadline: float | None = None, resend_every: float = 5.0, pass_fds: tuple = ()) -> int:
    """Run cmd in its own process group and wait for it. SIGTERM or SIGUSR1 (Slurm, before the time limit) become a
    SIGUSR1 to the whole group: the trainers checkpoint and stop, torchrun is left alone and reports how they ended.
    The workers start with SIGTERM and SIGUSR1 ignored, until the trainer installs its handler (imports take
    seconds): a signal that comes earlier is not fatal, and the launcher repeats it until the workers are gone."""
    stop = {s: signal.signal(s, signal.SIG_IGN) for s in STOP}
    try:
        proc = subprocess.Popen(cmd, start_new_session=True, pass_fds=pass_fds)
    finally:
        for signum, old in stop.items():
            signal.signal(signum, old)
    received: list[int] = []

    def on_stop(signum, frame):
        if not received:
            print(f"launch.py: {signal.Signals(signum).name} received: asking the workers to checkpoint and stop",
                  flush=True)
        received.append(signum)
        _signal_group(proc, signal.SIGUSR1)

    for signum in STOP:
        signal.signal(signum, on_stop)
    signal.signal(signal.SIGINT, lambda signum, frame: _signal_group(proc, signal.SIGINT))
    while True:
        try:
            return proc.wait(timeout=resend_every)
        except subprocess.TimeoutExpired:
            if deadline and not received and time.time() >= deadline:
                print("launch.py: the job's time limit is near: asking the workers to checkpoint and stop",
                      flush=True)
                received.append(signal.SIGUSR1)
            if received:
                _signal_group(proc, signal.SIGUSR1)


def descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc). torchrun starts each worker in a session of its own, out of reach of
    a signal to torchrun's process group."""
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{stat}/stat") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])  # the name in ( ) may hold spaces
                children.setdefault(parent, []).append(int(stat))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    """The signal to the process group of what the launcher started and to every process below it (the workers
    torchrun starts in sessions of their own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)
    for pid in descendants(proc.pid) if os.path.isdir("/proc") else []:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs the job asked for (resources.gpus)")
    parser.add_argument("--processes", type=int, default=0, help="processes per node; 0: from the allocation")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the job (resources.nodes)")
    parser.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    parser.add_argument("--exec-ignoring-stop-signals", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--srun", action="store_true",
                        help="start through srun with a rendezvous even on one node (what --nodes > 1 does)")
    parser.add_argument("--stop-before", type=int, default=300,
                        help="seconds before the Slurm job's time limit to checkpoint and stop; 0: never")
    parser.add_argument("--in-image", default="",
                        help="prefix that runs a command in the container image (hpc_finetune.workflow.container.container_prefix); "
                             "empty: on the host")
    parser.add_argument("--preflight", default="",
                        help="the preflight report: the strategy it chose (logged; sharded ones always get torchrun)")
    parser.add_argument("--lock", default="",
                        help="file to hold an exclusive lock on while training (one train job per run at a time)")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- the trainer and its arguments")
    args = parser.parse_args(argv)
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("give the trainer after --")
    if args.exec_ignoring_stop_signals:  # one node's part of a multi-node launch (see command())
        for signum in STOP:
            signal.signal(signum, signal.SIG_IGN)
        os.execvp(script[0], script)
    env = os.environ
    processes, source = processes_per_node(args.gpus, args.processes, env)
    strategy = planned_strategy(args.preflight)
    cmd = command(script, processes, args.nodes, args.port, env, srun=args.srun, image=shlex.split(args.in_image),
                  strategy=strategy)
    print(f"launch.py: {args.nodes} node(s) x {processes} process(es) per node ({source}); "
          f"world size {args.nodes * processes}; strategy {strategy or '-'}; "
          f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')!r}", flush=True)
    print(f"launch.py: {shlex.join(cmd)}", flush=True)
    if cmd[0] == "srun" and not shutil.which("srun"):
        raise SystemExit("launch.py: --nodes > 1 needs srun (run inside a Slurm job)")
    deadline = None
    end = job_end_time(env) if args.stop_before > 0 else None
    if end:
        deadline = end - args.stop_before
        print(f"launch.py: the job ends at {time.strftime('%H:%M:%S', time.localtime(end))}: checkpoint and stop at "
              f"{time.strftime('%H:%M:%S', time.localtime(deadline))}", flush=True)
    if not args.lock:
        return run(cmd, deadline)
    setup_logging()
    waiting = ("launch.py: this run's checkpoints are in use by {holder}: another train job of the same run is still "
               "going (a killed controller leaves its jobs running). Waiting for it to end, then resuming from "
               f"what it saved; to stop it instead, scancel that job or kill that pid (lock {args.lock})")
    with locked(args.lock, waiting, "put output_dir on a file system that supports locks") as lock:
        return run(cmd, deadline, pass_fds=(lock.fileno(),))


if __name__ == "__main__":
    sys.exit(main())
