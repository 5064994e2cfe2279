"""The GPU check (scripts/tools/gpu_check.py, `make gpu-check`): one prepared run that proves the stack on a GPU
machine lent for minutes, each step bounded in time and writing its figures as JSON into one folder ($OUT).

    0  install the bundled wheels (tools.benchmarks.bundle) into a folder put first on PYTHONPATH -> env.json
    m  build the random Llama-3.1-8B (bf16, demo tokenizer) that b-e share                   -> summary.json
    a  the workflow end to end on the GPU, demo preset (tiny Llama), 4-bit QLoRA in bf16      -> a.json
    b  bench.py train, 8B, micro-batch 1, seq 2048, checkpointing: ours vs plain TRL+PEFT     -> b.json
    c  the same at a throughput setting, then ours with each speed lever flipped (LEVERS)     -> c.json
    d  bench.py merge, 8B bf16: streaming merge vs peft, time and peak host RSS (on the CPU)  -> d.json
    e  the seed workflow's quick test: 500 medical-Q&A-shaped rows x 1 epoch, train stage     -> e.json

Order: 0, m, then a and d side by side (a barely uses the GPU, d only the CPU), b, e, c (PHASES). Each step runs in its own
process group with a time cap (Sizes.caps) and never past the overall budget; c comes last and takes what is
left, lever after lever (bench.py rewrites its JSON after each run, so a cut keeps what was measured). A step that
fails or times out gets its status and the tail of its log in its JSON; the others still run. The dry mode
(--dry) runs the same plumbing on the CPU with a small random Llama and a few steps, each step to its end: no time
cap and no budget unless --budget is given (its verdict says whether the plumbing works, not how fast a shared CPU
is; the caps are tested on their own). At most 8 files land in the output folder (the device tool brings back no
more): env, a-e and summary.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpc_finetune.io.files import write_json
from tools.benchmarks.models import REPO

TOOL = REPO / "scripts" / "tools" / "gpu_check.py"
STEPS = ("a", "b", "c", "d", "e")
NEEDS_MODEL = ("b", "c", "d", "e")
# Steps of a phase run side by side. On the GPU only a (hardly any GPU work) and d (CPU only) share a phase, so
# that b, c and e time the GPU alone; the dry run, whose figures time nothing, uses both cores.
PHASES = (("m",), ("a", "d"), ("b",), ("e",), ("c",))
DRY_PHASES = (("m",), ("a", "d", "b"), ("e", "c"))  # b and c share bench.py's work folder: never together


@dataclass(frozen=True)
class Lever:
    name: str
    variant: str  # KEY=VALUE[,KEY=VALUE] of our train stage (bench.py train --variant)
    gpu_only: bool = False
    needs: str = ""  # a module that must be importable


# Each flips one speed lever of hpc_finetune.train.speed against our defaults; ordered by what it is expected to
# be worth, torch.compile last (minutes of compilation).
LEVERS = (
    Lever("liger", "liger_kernels=true", gpu_only=True, needs="liger_kernel"),
    Lever("no-checkpointing", "gradient_checkpointing=false"),
    Lever("padding-free", "padding_free=true"),
    Lever("checkpoint-every-2", "gradient_checkpointing_every_n_layers=2"),
    Lever("packing", "packing=true"),
    Lever("fused-adamw", "optim=adamw_torch_fused"),
    Lever("reentrant", "gradient_checkpointing_mode=reentrant"),
    Lever("offload", "gradient_checkpointing_mode=offload", gpu_only=True),
    Lever("flash-attn-2", "attn_implementation=flash_attention_2", gpu_only=True, needs="flash_attn"),
    Lever("eager", "attn_implementation=eager"),
    Lever("compile", "torch_compile=true", gpu_only=True),
)
CORE_LEVERS = ("liger", "no-checkpointing", "padding-free")


@dataclass(frozen=True)
class Sizes:
    """What each step runs and the seconds it may take. GPU figures are estimates for one H200 (16 cores):
    expected a ~80 s (8 jobs of ~8 s start-up, 20 steps), m ~45 s (8B init on the GPU, 16 GB written),
    b ~90 s (2 runs of ~35 s start-up and 4-bit load + 6 steps), d ~120 s (two 16 GB merges), e ~120 s
    (3 short stages + the train job: ~35 s load, 32 steps of 16 rows, eval), c ~50 s a run."""

    arch: str
    budget_s: int | None  # the whole check, install included; None: no budget
    caps: dict = field(default_factory=dict)  # seconds per step; a step not listed has no cap
    a_config: dict = field(default_factory=dict)
    b: dict = field(default_factory=dict)  # bench.py train options
    c: dict = field(default_factory=dict)
    c_levers: tuple = CORE_LEVERS
    child_timeout_s: int | None = 150  # one bench.py run of step c; None: none
    e_rows: int = 500
    e_eval_rows: int = 25
    e_mean_tokens: int = 300
    e_config: dict = field(default_factory=dict)


GPU = Sizes(
    arch="llama3-8b-medical", budget_s=500,
    caps={"install": 90, "m": 150, "a": 180, "b": 150, "c": 300, "d": 240, "e": 200},
    a_config={"hyperparameters": "quick_test", "preflight__device": "gpu", "resources__gpus": 1,
              "merge__dtype": "auto", "evaluate__num_samples": 4, "evaluate__max_new_tokens": 32},
    b={"steps": 6, "warmup": 2, "micro-batch-size": 1, "gradient-accumulation": 4, "max-seq-length": 2048,
       "gradient-checkpointing": "true"},
    c={"steps": 6, "warmup": 2, "micro-batch-size": 8, "gradient-accumulation": 1, "max-seq-length": 2048,
       "gradient-checkpointing": "true"},
    e_config={"preflight__device": "gpu", "resources__gpus": 1},
)
# The dry run's steps run to their end (no caps, no budget unless --budget): on a loaded CPU a cap would fail the
# plumbing for being slow. The install keeps its cap (a pip that hangs).
DRY = Sizes(
    arch="small", budget_s=None, child_timeout_s=None, caps={"install": 90},
    a_config={"hyperparameters": "quick_test", "training__max_steps": 3, "training__eval_steps": 2,
              "training__save_steps": 2, "training__logging_steps": 1, "evaluate__num_samples": 2,
              "evaluate__max_new_tokens": 8, "resources__gpus": 0, "resources__cpus_per_gpu": 1},
    b={"steps": 3, "warmup": 1, "micro-batch-size": 1, "gradient-accumulation": 1, "max-seq-length": 64,
       "gradient-checkpointing": "true"},
    c={"steps": 3, "warmup": 1, "micro-batch-size": 4, "gradient-accumulation": 1, "max-seq-length": 64,
       "gradient-checkpointing": "true"},
    c_levers=("liger", "padding-free"),  # Liger: the listing of a lever that needs a GPU
    e_rows=24, e_eval_rows=4, e_mean_tokens=80,
    e_config={"resources__gpus": 0, "resources__cpus_per_gpu": 1, "training__optim": "adamw_torch",
              "training__micro_batch_size": 4, "training__gradient_accumulation": 2, "training__logging_steps": 1},
)
# What the device tool's `run` is given (README "Performance", "GPU check"): one call, the bundle carried.
RUN_COMMAND = "PYTHONUNBUFFERED=1 python3 scripts/tools/gpu_check.py --budget {budget}{extra}"
RUN_TIMEOUT_MARGIN_S = 60  # above the budget: the summary, and slack for a step that overruns its kill
RESERVE_S = 10  # kept back from the budget for the summary
MIN_STEP_S = 20  # a step is not started with less time than this left


def invocation(budget: int, extra: str = "") -> dict:
    """The `run` call of the device tool: command, carry list, timeout_s."""
    from tools.benchmarks.bundle import BUNDLE_DIR

    return {"command": RUN_COMMAND.format(budget=budget, extra=extra), "carry": [BUNDLE_DIR],
            "timeout_s": budget + RUN_TIMEOUT_MARGIN_S}


def levers(selection: str, sizes: Sizes) -> list[Lever]:
    """`core` (the sizes' own choice), `all`, or lever names separated by commas."""
    names = {lever.name: lever for lever in LEVERS}
    chosen = (sizes.c_levers if selection == "core" else names if selection == "all" else
              [n.strip() for n in selection.split(",") if n.strip()])
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise SystemExit(f"unknown lever(s) {', '.join(unknown)}; known: {', '.join(names)}")
    return [names[n] for n in chosen]


def lever_skip_reason(lever: Lever, dry: bool) -> str | None:
    import importlib.util

    if lever.gpu_only and dry:
        return "needs a GPU"
    if lever.needs and importlib.util.find_spec(lever.needs) is None:
        return f"{lever.needs} is not installed"
    return None


def step_env(site: Path | None, work: Path) -> dict:
    """The environment of every step: the bundle and the library importable, `python` the running interpreter
    (the stage rules call `python`), no network, caches in the work folder."""
    shims = work / "bin"
    shims.mkdir(parents=True, exist_ok=True)
    shim = shims / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    paths = [str(site)] if site else []
    paths += [str(REPO / "scripts")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_HOME": str(work / "hf-home"),
            "MPLCONFIGDIR": str(work / "mpl")}


@dataclass
class Running:
    name: str
    proc: subprocess.Popen
    log: Path
    started: float
    timeout: float | None  # seconds; None: the step runs to its end


def start_step(name: str, opts: dict, env: dict, work: Path, timeout: float | None) -> Running:
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(TOOL), "_step", name, json.dumps(opts)]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    return Running(name, proc, log, time.perf_counter(), timeout)


def kill_tree(proc: subprocess.Popen) -> None:
    """The step's process group and every descendant (Snakemake may start jobs in groups of their own)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for child in family:
            try:
                child.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        try:
            proc.wait(timeout=10)
            if sig == signal.SIGTERM:
                psutil.wait_procs(family, timeout=5)
        except subprocess.TimeoutExpired:
            continue


def wait_all(running: list[Running]) -> dict[str, dict]:
    """Wait for the steps of a phase; kill each at its timeout. Returns name -> {status, elapsed_s, ...}."""
    done: dict[str, dict] = {}
    while len(done) < len(running):
        for r in running:
            if r.name in done:
                continue
            elapsed = time.perf_counter() - r.started
            code = r.proc.poll()
            if code is None and r.timeout is not None and elapsed > r.timeout:
                kill_tree(r.proc)
                done[r.name] = {"status": "timeout", "exit_code": None}
            elif code is not None:
                kill_tree(r.proc)  # whatever it left behind
                done[r.name] = {"status": "ok" if code == 0 else "failed", "exit_code": code}
            else:
                continue
            done[r.name].update(elapsed_s=round(time.perf_counter() - r.started, 1),
                                timeout_s=None if r.timeout is None else round(r.timeout), log=str(r.log))
            print(f"gpu-check: step {r.name} {done[r.name]['status']} after {done[r.name]['elapsed_s']:.0f} s "
                  f"({cap_text(r.timeout)})", flush=True)
        time.sleep(0.5)
    return done


def cap_text(timeout: float | None) -> str:
    return "no cap" if timeout is None else f"cap {timeout:.0f} s"


def step_timeout(cap: float | None, left: float | None) -> float | None:
    """The step's time cap: the smaller of its own cap and what is left of the budget (None for neither)."""
    limits = [t for t in (cap, left) if t is not None]
    return min(limits) if limits else None


def log_tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-chars:]


def finish_step(name: str, outcome: dict, work: Path, out: Path) -> dict:
    """out/<step>.json: the figures the step wrote (or what it had written when it was stopped), its outcome,
    and the verdict of its checks (tools.benchmarks.gpureport.CHECKS)."""
    from tools.benchmarks.gpureport import CHECKS

    raw, extra = work / "steps" / f"{name}.json", work / "steps" / f"{name}-extra.json"
    figures = json.loads(raw.read_text()) if raw.is_file() else {}
    if figures and extra.is_file():
        figures.update(json.loads(extra.read_text()))
    problems = CHECKS[name](figures) if figures else ["no figures written"]
    status = outcome["status"]
    if status == "ok" and problems:
        status = "failed"
    elif status == "timeout" and figures and figures.get("results"):
        status = "partial"
    report = {"step": name, **figures, **{k: v for k, v in outcome.items() if k != "log"}, "status": status,
              "problems": problems}
    if status != "ok":
        report["log_tail"] = log_tail(Path(outcome["log"]))
    if name in STEPS:
        write_json(out / f"{name}.json", report)
    return report


def run_check(args) -> dict:
    """The whole check (see the module docstring); returns the summary."""
    from tools.benchmarks import bundle
    from tools.benchmarks.gpureport import summary_rows

    started = time.perf_counter()
    sizes = DRY if args.dry else GPU
    budget = args.budget or sizes.budget_s
    out = Path(args.out or os.environ.get("OUT") or REPO / "results" / "gpu-check")
    work = Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("env", *STEPS, "summary"):  # no figure of an earlier check may pass for this one's
        (out / f"{name}.json").unlink(missing_ok=True)
    (work / "steps").mkdir(parents=True, exist_ok=True)
    only = [s.strip() for s in args.only.split(",")] if args.only else list(STEPS)
    if any(s not in STEPS for s in only):
        raise SystemExit(f"--only takes steps among {', '.join(STEPS)}, got {args.only}")
    env_report = install_step(args, sizes, work)
    site = Path(env_report["install"]["site"]) if env_report["install"].get("site") else None
    if site:  # this process too decides with the bundle in view (which levers can run)
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    env = step_env(site, work)
    env_report.update(probe_environment(env))
    write_json(out / "env.json", env_report)
    chosen = levers(args.levers, sizes)
    opts = {"dry": args.dry, "work": str(work), "sizes": asdict(sizes),
            "levers": [asdict(lv) for lv in chosen],
            "lever_skips": {lv.name: lever_skip_reason(lv, args.dry) for lv in chosen}}
    results: dict[str, dict] = {}
    for phase in DRY_PHASES if args.dry else PHASES:
        steps = [s for s in phase if s in only or (s == "m" and any(x in only for x in NEEDS_MODEL))]
        running = []
        for name in steps:
            left = None if budget is None else budget - (time.perf_counter() - started) - RESERVE_S
            if name in NEEDS_MODEL and results.get("m", {}).get("status") != "ok":
                results[name] = skipped(name, "the model build (step m) did not succeed", work, out)
            elif left is not None and left < MIN_STEP_S:
                results[name] = skipped(name, f"out of budget ({budget} s)", work, out)
            else:
                timeout = step_timeout(sizes.caps.get(name), left)
                allowed = "no time cap" if timeout is None else f"{timeout:.0f} s allowed"
                print(f"gpu-check: step {name} starts ({allowed})", flush=True)
                running.append(start_step(name, opts, env, work, timeout))
        for name, outcome in wait_all(running).items():
            results[name] = finish_step(name, outcome, work, out)
    summary = {"dry": args.dry, "device": env_report.get("device"), "budget_s": budget,
               "elapsed_s": round(time.perf_counter() - started, 1),
               "install": env_report["install"],
               "steps": {name: {k: r.get(k) for k in ("status", "elapsed_s", "timeout_s", "problems", "reason")}
                         for name, r in results.items()},
               "model": {k: results.get("m", {}).get(k) for k in ("path", "parameters", "build_s", "weights_bytes")},
               "table": summary_rows(results, sizes)}
    write_json(out / "summary.json", summary)
    print_summary(summary)
    carried = bundle.folder_bytes(out)
    print(f"gpu-check: {len(list(out.iterdir()))} files, {carried / 2**20:.2f} MiB in {out}")
    return summary


def skipped(name: str, reason: str, work: Path, out: Path) -> dict:
    report = {"step": name, "status": "skipped", "reason": reason, "problems": []}
    if name in STEPS:
        write_json(out / f"{name}.json", report)
    print(f"gpu-check: step {name} skipped: {reason}", flush=True)
    return report


def install_step(args, sizes: Sizes, work: Path) -> dict:
    """Install the bundle unless told not to (dry runs where everything is importable skip it)."""
    from tools.benchmarks import bundle

    folder = Path(args.bundle)
    missing = [m for m in bundle.MODULES if not importable(m)]
    needed = [m for m in missing if not (args.dry and m == "liger_kernel")]  # Liger runs only on a GPU
    have_bundle = folder.is_dir() and any(folder.glob("*.whl"))
    if not (have_bundle and (args.install or not args.dry or needed)):
        if needed:
            raise SystemExit(f"{', '.join(needed)} not importable and no bundle in {folder}: run `make gpu-bundle` "
                             "in the checkout the tree is sent from, and carry it")
        return {"install": {"skipped": True, "missing_before": missing,
                            "why": "everything the check needs is importable"}}
    site = Path(args.site)
    shutil.rmtree(site, ignore_errors=True)
    report = {"install": {**bundle.install(folder, site, timeout=sizes.caps.get("install")), "missing_before": missing}}
    print(f"gpu-check: installed {report['install']['wheels']} wheels into {site} in "
          f"{report['install']['install_s']} s", flush=True)
    return report


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def probe_environment(env: dict) -> dict:
    """Device, versions and unmet requirements as the steps will see them (a child with the steps' environment)."""
    code = ("import json, tools.benchmarks.gpusteps as g; print(json.dumps(g.environment()))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"probe_error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_summary(summary: dict) -> None:
    rows = summary["table"]
    width = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    budget = "no budget" if summary["budget_s"] is None else f"a {summary['budget_s']} s budget"
    title = (f"GPU check{' (dry run on the CPU)' if summary['dry'] else ''}: {summary['device']}; "
             f"{summary['elapsed_s']:.0f} s of {budget}")
    print(title)
    print("-" * len(title))
    for i, row in enumerate(rows):
        print("  ".join(f"{str(c):<{w}}" for c, w in zip(row, width, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in width))
    for name, step in summary["steps"].items():  # why, for a step that did not pass (its JSON has its log's tail)
        if step["status"] != "ok":
            print(f"{name}: {step['status']}: {'; '.join(step.get('problems') or []) or step.get('reason') or ''}")
