"""lm-evaluation-harness tasks on the base and the fine-tuned model (evaluate.lm_eval_tasks).

Each model runs in a `python -m lm_eval run --model hf` process of its own: lm-eval's own command line, the
model's memory given back when it ends, and no clash between the `evaluate` package lm-eval imports and the
stage program scripts/evaluate.py. It runs in evaluate.lm_eval_include_path when set (so a custom task's relative
`data_files` are found next to its YAML). Nothing here fails the stage: lm-eval missing, an unknown task or task
data that cannot be had offline give a `skipped` reason instead.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from hpc_finetune.io.cli import log

INSTALL_HINT = "install it (pip install lm-eval==0.4.13, pinned in singularity/requirements.in and requirements.lock)"


def model_args(path: str, dtype: str, adapter: str | None = None) -> str:
    return f"pretrained={path},dtype={dtype}" + (f",peft={adapter}" if adapter else "")


def failure_reason(output: str) -> str:
    """The line of lm-eval's output that says why it stopped (its last error line)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line or "not found" in line]
    return (errors or lines or ["no output"])[-1][:400]


def read_results(out_dir: Path, tasks: list[str]) -> dict:
    """{task: {metric: (value, rows)}} from the results_*.json lm-eval wrote."""
    found = sorted(out_dir.rglob("results_*.json"))
    if not found:
        raise ValueError(f"lm-eval wrote no results under {out_dir}")
    data = json.loads(found[-1].read_text())
    out = {}
    for task, values in data["results"].items():
        rows = data.get("n-samples", {}).get(task, {}).get("effective")
        out[task] = {key.split(",")[0]: (value, rows) for key, value in values.items()
                     if "," in key and "_stderr" not in key and isinstance(value, int | float)}
    return out


def run_one(name: str, args: str, tasks: list[str], limit: int | None, include_path: str | None, device: str,
            batch_size: int, out_dir: Path) -> tuple[dict | None, str | None]:
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", args, "--tasks",
               ",".join(tasks), "--device", device, "--batch_size", str(batch_size), "--output_path", str(out_dir)]
    if limit is not None:
        command += ["--limit", str(limit)]
    if include_path:
        command += ["--include_path", str(Path(include_path).resolve())]
    log.info("lm-eval on the %s model: %s", name, " ".join(command[1:]))
    with tempfile.TemporaryDirectory() as scratch:  # never the stage's directory (scripts/evaluate.py)
        done = subprocess.run(command, cwd=include_path or scratch, capture_output=True, text=True, check=False)
    (out_dir / "lm_eval.log").parent.mkdir(parents=True, exist_ok=True)
    (out_dir / "lm_eval.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        why = failure_reason(done.stdout + done.stderr)
        hint = ("; the task data is not in the local Hugging Face cache and the hub is out of reach: fetch it on a "
                "node with internet, or use a local task (evaluate.lm_eval_include_path)"
                if "ConnectionError" in why or "Offline" in why else "")
        return None, f"lm-eval failed on the {name} model: {why}{hint}"
    try:
        return read_results(out_dir, tasks), None
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        return None, f"lm-eval on the {name} model: {err}"


def run_tasks(tasks: list[str], limit: int | None, include_path: str | None, models: dict[str, str], device: str,
              batch_size: int, out_dir: str, known: dict | None = None) -> dict | None:
    """{tasks, limit, skipped, results: {task: {metric: {base, finetuned, rows}}}}; None without tasks. models:
    {"base": model_args, "finetuned": model_args}, or one of them: the other side is None, or taken from `known`
    (a result of an earlier call for the other model: the evaluate stage's base part)."""
    if not tasks:
        return None
    result = {"tasks": tasks, "limit": limit, "include_path": include_path, "skipped": None, "results": {}}
    if importlib.util.find_spec("lm_eval") is None:
        return result | {"skipped": f"lm-eval is not installed; {INSTALL_HINT}"}
    if known and known.get("skipped"):
        return result | {"skipped": known["skipped"]}
    if include_path and not Path(include_path).is_dir():
        return result | {"skipped": f"evaluate.lm_eval_include_path {include_path} is not a directory"}
    per_model = {name: {task: {metric: (value[name], value["rows"]) for metric, value in metrics.items()}
                        for task, metrics in known["results"].items()}
                 for name in ("base", "finetuned") if known and name not in models}
    for name, args in models.items():
        found, why = run_one(name, args, tasks, limit, include_path, device, batch_size, Path(out_dir) / name)
        if why:
            log.warning("lm-eval tasks skipped: %s", why)
            return result | {"skipped": why}
        per_model[name] = found
    first = next(iter(per_model.values()))
    for task, metrics in first.items():
        values = {name: per_model.get(name, {}).get(task, {}) for name in ("base", "finetuned")}
        result["results"][task] = {metric: {name: values[name].get(metric, (None,))[0] for name in values} | {"rows": rows}
                                   for metric, (_, rows) in metrics.items()}
    return result
