"""Serve-check stage: the hand-off, proven by vLLM. vLLM (its own interpreter or image: it cannot share our
environment) loads the merged model, and the adapter on its base when it is published, answers the evaluate
stage's first test prompts at temperature 0, and its answers are compared with the evaluate stage's fine-tuned
answers. A refusal, or a match rate below --tolerance, fails the stage with vLLM's own error and the fix.

    python scripts/serve_check.py --vllm .venv-vllm/bin/python --model-json results/demo/model/model.json \
        --merged results/demo/merged --adapter results/demo/adapters --samples results/demo/eval/samples.jsonl \
        --evaluate-json results/demo/metrics/evaluate.json --data-dir results/demo/data \
        --num-prompts 64 --tolerance 0.9 --dtype auto --max-model-len 4096 --enforce-eager false \
        --metrics-out results/demo/metrics/serve_check.json

metrics/serve_check.json: vLLM's version, per artifact the match rate, load time, answer time and tokens/s.
hpc_finetune.serve drives vLLM (runner.py, engine.py) and judges its answers (check.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.io.cli import StageError, cli, log, table
from hpc_finetune.io.files import model_dir, read_json, write_json
from hpc_finetune.io.schema import option
from hpc_finetune.serve.check import adapter_rank, failure, match, model_len, test_prompts
from hpc_finetune.serve.runner import run_engine


@dataclass
class Config:
    vllm: str = field(metadata={"help": "command of vLLM's Python interpreter (a path, or `apptainer exec ... python3`)"})
    model_json: str = field(metadata={"help": "model record of the model stage (its 'path' is the base model)"})
    samples: str = field(metadata={"help": "the evaluate stage's samples.jsonl (its fine-tuned answers)"})
    evaluate_json: str = field(metadata={"help": "the evaluate stage's metrics (its dtype and max_new_tokens)"})
    data_dir: str = field(metadata={"help": "the data stage's directory (the scored split's rows)"})
    metrics_out: str = field(metadata={"help": "metrics/serve_check.json"})
    merged: str | None = field(default=None, metadata={"help": "merged model directory (null: none)"})
    adapter: str | None = field(default=None, metadata={"help": "adapter directory, served on the base (null: none)"})
    num_prompts: int | None = option("serve_check.num_prompts")
    tolerance: float = option("serve_check.tolerance")
    dtype: str = option("serve_check.dtype")
    max_model_len: int = option("serve_check.max_model_len")
    enforce_eager: bool = option("serve_check.enforce_eager")


def main(cfg: Config) -> dict:
    started = time.time()
    if not cfg.merged and not cfg.adapter:
        raise StageError("nothing to serve: pass --merged and/or --adapter")
    evaluate = read_json(cfg.evaluate_json, "evaluate metrics")
    prompts, expected = test_prompts(cfg.samples, cfg.data_dir, cfg.num_prompts)
    dtype = evaluate.get("dtype", "float32") if cfg.dtype == "auto" else cfg.dtype
    max_tokens = evaluate["max_new_tokens"]
    jobs, what = [], {}
    if cfg.merged:
        jobs.append({"name": "merged", "model": cfg.merged})
        what["merged"] = f"the merged model {cfg.merged}"
    if cfg.adapter:
        jobs.append({"name": "adapter", "model": model_dir(cfg.model_json), "adapter": cfg.adapter,
                     "max_lora_rank": adapter_rank(cfg.adapter)})
        what["adapter"] = f"the adapter {cfg.adapter} on its base"
    if not expected:  # text rows: the evaluate stage generated nothing; vLLM still loads each artifact
        prompts = {"prompts": ["Hello"]}
    for job in jobs:
        job.update(prompts, max_tokens=max_tokens)
    length = model_len(cfg.merged or model_dir(cfg.model_json), cfg.max_model_len)
    engine = {"dtype": dtype, "max_model_len": length, "enforce_eager": cfg.enforce_eager}
    log.info("vLLM answers %d prompts with %s (%s, up to %d tokens each)", len(expected), " and ".join(what.values()),
             dtype, max_tokens)
    out = Path(cfg.metrics_out)
    result = run_engine(cfg.vllm, {"engine": engine, "jobs": jobs}, out.parent / "serve_check",
                        log_path=out.parent / "serve_check" / "vllm.log")
    checked, errors = {}, []
    for name, job in result["jobs"].items():
        item = {"what": what[name], **{k: job[k] for k in ("error", "stage", "load_s", "generate_s") if k in job}}
        if "texts" in job:
            item["match"] = match(expected, job["texts"]) if expected else {"prompts": 0, "match_rate": None}
            item["output_tokens"] = job["output_tokens"]
            item["tokens_per_s"] = round(job["output_tokens"] / job["generate_s"], 1) if job["generate_s"] else None
        checked[name] = item
        problem = failure(name, what[name], item, cfg.tolerance)
        item["passed"] = problem is None
        errors += [problem] * (problem is not None)
    metrics = {"vllm_version": result["version"], "passed": not errors, "tolerance": cfg.tolerance, "dtype": dtype,
               "engine": engine, "prompts": len(expected), "served": checked, "errors": errors,
               "wall_time_s": round(time.time() - started, 1)}
    rows = [(name, f"{item['match']['match_rate']:.3f}" if item.get("match", {}).get("match_rate") is not None
             else ("refused" if "error" in item else "n/a"), item.get("load_s", "-"), item.get("tokens_per_s", "-"))
            for name, item in checked.items()]
    log.info("\n%s", table([("artifact", "match rate / load s / tokens/s"), *(
        (n, f"{m} / {ld} / {t}") for n, m, ld, t in rows)], title=f"served by vLLM {result['version']}"))
    if errors:
        write_json(out.parent / "serve_check" / "failed.json", metrics)
        raise StageError("\n\n".join(errors))
    write_json(cfg.metrics_out, metrics)
    return metrics


if __name__ == "__main__":
    cli(main, Config, __doc__)
