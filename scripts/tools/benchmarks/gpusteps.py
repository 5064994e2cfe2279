"""The steps of the GPU check (tools.benchmarks.gpucheck has the order, the time caps and the sizes): each runs in
a process of its own (`gpu_check.py _step NAME OPTS`) and writes its figures to {work}/steps/NAME.json; CHECKS
says what a step's figures must show to pass; summary_rows makes the closing table. b, c and d are
scripts/tools/bench.py runs; a and e run the workflow with Snakemake, as a user does."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hpc_finetune.io.files import write_json
from tools.benchmarks.models import BENCH, DEMO_DATA, REPO

REFERENCE_S = 25 * 60  # Parallel Works guide: the quick test of Llama-3-8B on an A100-40GB


def raw_path(opts: dict, name: str, suffix: str = "") -> Path:
    return Path(opts["work"]) / "steps" / f"{name}{suffix}.json"


def model_path(opts: dict) -> Path:
    return Path(opts["work"]) / "bench" / "models" / opts["sizes"]["arch"]


def environment() -> dict:
    """Device, versions of the stack, and the requirements of the bundled packages this environment does not meet."""
    import platform
    from importlib import metadata

    import torch
    from tools.benchmarks import bundle

    names = [r.split("==")[0] for r in bundle.requirements()]
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()})"
    versions = {}
    for name in ("torch", "triton", "accelerate", "safetensors", "numpy", *names, "flash-attn"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info["versions"] = versions
    info["unmet_requirements"] = bundle.unmet_requirements([n for n in names if versions.get(n)])
    return info


def step_m(opts: dict) -> None:
    """The random model of the check's architecture (bf16, the demo tokenizer), where bench.py finds it."""
    from hpc_finetune.data.source import dataset_texts
    from hpc_finetune.model.demo import build as build_demo
    from hpc_finetune.model.weights import weights_bytes
    from tools.benchmarks.models import build_random_model

    root = Path(opts["work"]) / "bench"
    demo_dir = root / "models" / "demo"
    if not (demo_dir / "config.json").is_file():
        build_demo(dataset_texts(str(DEMO_DATA)), demo_dir, 0, DEMO_DATA.name)
    start = time.perf_counter()
    path = build_random_model(opts["sizes"]["arch"], model_path(opts), demo_dir, "bfloat16")
    size = weights_bytes(path)
    write_json(raw_path(opts, "m"), {"path": str(path), "arch": opts["sizes"]["arch"], "dtype": "bfloat16",
                                     "build_s": round(time.perf_counter() - start, 1), "weights_bytes": size,
                                     "parameters": size // 2})


def run_logged(cmd: list[str], cwd: Path | None = None) -> tuple[int, float]:
    print("+", " ".join(map(str, cmd)), flush=True)
    start = time.perf_counter()
    code = subprocess.run([str(c) for c in cmd], cwd=cwd).returncode
    return code, round(time.perf_counter() - start, 1)


def project(opts: dict, name: str) -> Path:
    """A project directory as a user has it: the repository's config.yaml and its data/ beside."""
    path = Path(opts["work"]) / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shutil.copy2(REPO / "config.yaml", path / "config.yaml")
    (path / "data").symlink_to(REPO / "data")
    return path


def snakemake(path: Path, config: dict, *extra: str) -> tuple[list[str], int, float]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--profile",
           str(REPO / "profiles" / "local"), "--directory", str(path), *extra, "--config",
           *[f"{k}={v}" for k, v in config.items()]]
    code, wall = run_logged(cmd, cwd=path)
    return cmd, code, wall


def stage_walls(run: Path) -> dict:
    """Wall seconds of each job, from the rules' `benchmark:` files."""
    from hpc_finetune.report.tables import read_benchmarks

    return {b["stage"]: float(b["s"]) for b in read_benchmarks(sorted((run / "benchmarks").glob("*.tsv")))}


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def pick(d: dict, *keys: str) -> dict:
    return {k: d.get(k) for k in keys}


def step_a(opts: dict) -> None:
    """The workflow end to end (demo preset: the tiny Llama it builds, 4-bit QLoRA; bf16 on a GPU)."""
    path = project(opts, "a")
    config = {"run_name": "gpu-check", **opts["sizes"]["a_config"]}
    cmd, code, wall = snakemake(path, config)
    run = path / "results" / "gpu-check"
    preflight, train = read(run / "preflight.json"), read(run / "metrics" / "train.json")
    write_json(raw_path(opts, "a"), {
        "dry": opts["dry"], "expected_device": "cpu" if opts["dry"] else "cuda", "command": cmd, "exit_code": code,
        "wall_s": wall, "stage_wall_s": stage_walls(run),
        "preflight": {**pick(preflight, "device", "bf16", "torch", "cuda_version", "driver_version"),
                      "gpus": preflight.get("gpus"), "estimate_mb": (preflight.get("estimate_mb") or {}).get("total_mb")},
        "train": pick(train, "device", "bf16", "quantization", "steps", "tokens", "train_loss_first",
                      "train_loss_last", "eval_loss_first", "eval_loss_last", "tokens_per_second", "peak_memory",
                      "adapter_max_abs_change"),
        "merge": pick(read(run / "metrics" / "merge.json"), "method", "dtype", "max_abs_logit_diff", "tolerance",
                      "wall_time_s", "peak_memory"),
        "evaluate": pick(read(run / "metrics" / "evaluate.json"), "dtype", "base_eval_loss", "finetuned_eval_loss",
                         "base_eval_exact_match", "eval_exact_match", "samples_generated", "wall_time_s"),
    })
    if code != 0:
        raise SystemExit(f"the workflow failed (exit status {code})")


def bench_options(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in (f"--{k}", str(v))]


def bench_train(opts: dict, name: str, options: dict, *extra: str) -> None:
    root = Path(opts["work"]) / "bench"
    cmd = [sys.executable, BENCH, "train", "--preset", opts["sizes"]["arch"], *bench_options(options),
           "--work", root, "--out", raw_path(opts, name), *extra]
    write_json(raw_path(opts, name, "-extra"), {"command": [str(c) for c in cmd]})
    code, _ = run_logged(cmd)
    if code != 0:
        raise SystemExit(f"bench.py train failed (exit status {code})")


def step_b(opts: dict) -> None:
    """Micro-batch 1, sequence 2048, gradient checkpointing: ours vs the plain TRL+PEFT baseline."""
    bench_train(opts, "b", opts["sizes"]["b"])


def step_c(opts: dict) -> None:
    """The throughput setting, then ours with each lever flipped (the ones that cannot run here are listed)."""
    skips = {name: why for name, why in opts["lever_skips"].items() if why}
    runnable = [lv for lv in opts["levers"] if lv["name"] not in skips]
    extra = [a for lv in runnable for a in ("--variant", lv["variant"])]
    root = Path(opts["work"]) / "bench"
    cmd = [sys.executable, BENCH, "train", "--preset", opts["sizes"]["arch"], *bench_options(opts["sizes"]["c"]),
           "--work", root, "--out", raw_path(opts, "c"), "--keep-going", *extra]
    if opts["sizes"]["child_timeout_s"] is not None:
        cmd += ["--child-timeout", opts["sizes"]["child_timeout_s"]]
    write_json(raw_path(opts, "c", "-extra"), {
        "command": [str(c) for c in cmd], "levers": {lv["name"]: f"ours[{lv['variant']}]" for lv in runnable},
        "levers_skipped": skips})
    code, _ = run_logged(cmd)
    if code != 0:
        raise SystemExit(f"bench.py train failed (exit status {code})")


def step_d(opts: dict) -> None:
    """The streaming merge vs peft's merge_and_unload on the check's model in bf16 (CPU, child processes)."""
    root = Path(opts["work"]) / "bench"
    cmd = [sys.executable, BENCH, "merge", "--arch", opts["sizes"]["arch"], "--base", model_path(opts),
           "--methods", "streaming", "peft", "--work", root, "--out", raw_path(opts, "d")]
    write_json(raw_path(opts, "d", "-extra"), {"command": [str(c) for c in cmd]})
    code, _ = run_logged(cmd)
    if code != 0:
        raise SystemExit(f"bench.py merge failed (exit status {code})")


def seed_rows(tokenizer, n: int, mean_tokens: int, seed: int = 0) -> list[dict]:
    """n chat rows shaped like the demo's medical Q&A (system, user, assistant), each as long as a demo row scaled
    so that the mean is `mean_tokens`: the answer is continued with other demo answers, as real answers run on."""
    demo = [json.loads(line)["messages"] for line in DEMO_DATA.read_text().splitlines()]
    answers = [m[-1]["content"] for m in demo]

    def length(messages: list[dict]) -> int:
        return sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in messages)

    lengths = [length(m) for m in demo]
    scale = mean_tokens / (sum(lengths) / len(lengths))
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randrange(len(demo))
        messages = [dict(m) for m in demo[k]]
        target = round(lengths[k] * scale)
        while length(messages) < target:
            messages[-1]["content"] += " " + rng.choice(answers)
        rows.append({"messages": messages})
    return rows


def step_e(opts: dict) -> None:
    """The seed workflow's quick test: 500 rows x 1 epoch through the data, preflight and train stages on the
    check's model (a local model, as a user's downloaded one), timed from the train job's start to its adapter."""
    from transformers import AutoTokenizer

    sizes, model = opts["sizes"], model_path(opts)
    path = project(opts, "e")
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = path / "seed-data"
    data.mkdir()
    rows = seed_rows(tokenizer, sizes["e_rows"] + sizes["e_eval_rows"], sizes["e_mean_tokens"])
    for split, part in (("train", rows[:sizes["e_rows"]]), ("validation", rows[sizes["e_rows"]:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    tokens = [sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in r["messages"])
              for r in rows]
    # a timing on random weights: the convergence verdict is recorded, not allowed to fail the job (a few dry steps
    # on the CPU improve the loss by less than its tolerance)
    config = {"run_name": "seed-quick-test", "preset": "llama3-8b-medical", "model__source": "local",
              "model__path": str(model), "model__model_id": f"gpu-check/random-{sizes['arch']}",
              "dataset__path": str(data), "training__epochs": 1, "training__convergence__fail_stage": False,
              **sizes["e_config"]}
    cmd, code, wall = snakemake(path, config, "--until", "train")
    run = path / "results" / "seed-quick-test"
    train = read(run / "metrics" / "train.json")
    job = stage_walls(run).get("train")
    write_json(raw_path(opts, "e"), {
        "dry": opts["dry"], "expected_device": "cpu" if opts["dry"] else "cuda", "command": cmd, "exit_code": code,
        "rows": sizes["e_rows"], "eval_rows": sizes["e_eval_rows"], "epochs": 1,
        "row_tokens_mean": round(sum(tokens) / len(tokens), 1), "row_tokens_max": max(tokens),
        "snakemake_wall_s": wall, "stage_wall_s": stage_walls(run), "train_job_s": job,
        "adapter_saved": (run / "adapters" / "adapter_model.safetensors").is_file(),
        "reference_s": REFERENCE_S, "reference": "Parallel Works guide: Llama-3-8B quick test on an A100-40GB",
        "speedup_vs_reference": REFERENCE_S / job if job and not opts["dry"] else None,
        "train": pick(train, "device", "bf16", "quantization", "steps", "epochs", "tokens", "train_loss_first",
                      "train_loss_last", "eval_loss_first", "eval_loss_last", "wall_time_s", "train_seconds",
                      "tokens_per_second", "peak_memory", "effective_batch_size"),
        "convergence": (train.get("convergence") or {}).get("verdict"),
    })
    if code != 0:
        raise SystemExit(f"the workflow failed (exit status {code})")


STEP_FUNCTIONS = {"m": step_m, "a": step_a, "b": step_b, "c": step_c, "d": step_d, "e": step_e}


def run_step(name: str, opts: dict) -> None:
    raw_path(opts, name).unlink(missing_ok=True)
    raw_path(opts, name, "-extra").unlink(missing_ok=True)
    STEP_FUNCTIONS[name](opts)
