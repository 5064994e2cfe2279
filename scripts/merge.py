"""Merge stage: fold the LoRA adapter into the unquantised base model and save full weights that vLLM can serve,
then prove it: the merged model, reloaded from disk, must give the logits of base+adapter.

    python scripts/merge.py --merged-save-format safetensors --dtype auto --max-shard-size 5GB \
        --check-samples 4 --tolerance null --model-json results/demo/model/model.json \
        --adapter-dir results/demo/adapters --eval-data results/demo/data/eval.jsonl \
        --output-dir results/demo/merged --report-out results/demo/metrics/merge.json

The base is reloaded in full precision (float32 on CPU, bfloat16 on GPU with dtype auto), never merged into the
4-bit training model: that would save re-quantised weights. The output is written into a hidden sibling directory
and renamed into place only after the check passes, so a failed merge leaves no half-written model and keeps an
earlier good one. config.json and tokenizer_config.json also carry the transformers-4 keys
(hpc_finetune.model.portable), so that vLLM servers still on transformers 4 load the model with the right RoPE and
tokenizer. hpc_finetune.merge holds the adapter checks, both merges, the logit check and the saving.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.io.cli import StageError, cli, log, table
from hpc_finetune.io.files import model_dir, write_json
from hpc_finetune.io.measure import peak_memory
from hpc_finetune.io.schema import option
from hpc_finetune.merge import streaming
from hpc_finetune.merge.adapter import check_adapter
from hpc_finetune.merge.check import check_inputs, check_rows, default_tolerance, describe
from hpc_finetune.merge.methods import merge_and_check
from hpc_finetune.merge.save import install
from hpc_finetune.model.load import dtype_name, load_tokenizer, resolve_dtype

FORMATS = ("safetensors", "bin")


@dataclass
class Config:
    model_json: str = field(metadata={"help": "model record of the model stage (its 'path' is the base model)"})
    adapter_dir: str = field(metadata={"help": "LoRA adapter directory from the train stage"})
    eval_data: str = field(metadata={"help": "eval.jsonl; its first rows feed the logit check (may be empty)"})
    output_dir: str = field(metadata={"help": "directory of the merged model"})
    report_out: str = field(metadata={"help": "JSON report of the merge and its check"})
    merged_save_format: str = option("merge.merged_save_format")
    dtype: str = option("merge.dtype")
    max_shard_size: str = option("merge.max_shard_size")
    check_samples: int = option("merge.check_samples")
    tolerance: float | None = option("merge.tolerance")
    streaming: str = option("merge.streaming")


def make_report(cfg: Config, base_dir: str, output: Path, merged: dict, how: tuple[str, str], tolerance: float,
                dtype, files: list[dict], inputs: list, used_rows: bool, start: float) -> dict:
    method, why = how
    result, check = merged["result"], merged["check"]
    shards = [f for f in files if f["name"].endswith((".safetensors", ".bin"))]
    return {
        "output_dir": str(output), "base_model": base_dir, "adapter_dir": cfg.adapter_dir, "method": method,
        "method_reason": why,
        "check": "logits of the merged model reloaded from disk vs base+adapter"
        + (" (base+adapter and the reloaded model loaded one at a time; no merged model in memory)"
           if method == "streaming" else " and vs the in-memory merged model"),
        **{k: v for k, v in check.items() if k != "passed"},
        "tolerance": tolerance, "adapter_effect_max_abs_logit": result["adapter_effect"], "dtype": dtype_name(dtype),
        "format": cfg.merged_save_format, "max_shard_size": cfg.max_shard_size, "files": files,
        "num_shards": len(shards), "weights_bytes": sum(f["bytes"] for f in shards),
        "total_bytes": sum(f["bytes"] for f in files), "num_parameters": result["num_parameters"],
        "transformers4_keys": merged["portable"], "check_samples": len(inputs),
        "check_source": cfg.eval_data if used_rows else "fixed text (eval data is empty)",
        "wall_time_s": round(time.time() - start, 2), "peak_memory": peak_memory(),
    }


def main(cfg: Config) -> dict:
    start = time.time()
    if cfg.merged_save_format not in FORMATS:
        raise StageError(f"merged_save_format {cfg.merged_save_format!r}: use one of {', '.join(FORMATS)}")
    if cfg.check_samples < 1:
        raise StageError("check_samples must be at least 1")
    dtype = resolve_dtype(cfg.dtype)
    tolerance = cfg.tolerance if cfg.tolerance is not None else default_tolerance(dtype)
    base_dir = model_dir(cfg.model_json)
    check_adapter(cfg.adapter_dir, base_dir)
    tokenizer = load_tokenizer(cfg.adapter_dir, base_dir)
    eval_rows = check_rows(cfg.eval_data, cfg.check_samples)
    inputs = check_inputs(tokenizer, eval_rows, cfg.check_samples, cfg.eval_data)
    if not eval_rows:
        log.warning("%s has no rows: checking the merge on a fixed text instead", cfg.eval_data)

    output = Path(cfg.output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.*"):  # .partial-<pid>, .old-<pid>, .damaged (README, faults)
        log.info("removing %s left by an interrupted merge", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    use_streaming, why = streaming.choose(cfg.streaming, base_dir)
    method = "streaming" if use_streaming else "in-memory"
    try:
        tmp.mkdir()
        log.info("merging %s into %s (%s, %s, %s merge: %s)", cfg.adapter_dir, base_dir, cfg.merged_save_format,
                 dtype_name(dtype), method, why)
        merged = merge_and_check(base_dir, cfg.adapter_dir, tokenizer, dtype, inputs, tmp, cfg.merged_save_format,
                                 cfg.max_shard_size, use_streaming, tolerance, output)
        files = [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()]
        install(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = make_report(cfg, base_dir, output, merged, (method, why), tolerance, dtype, files, inputs,
                         bool(eval_rows), start)
    write_json(cfg.report_out, report)
    log.info("\n%s", table([
        ("merged model", report["output_dir"]),
        ("format / dtype", f"{report['format']} / {report['dtype']}"),
        ("method", f"{method} ({why})"),
        ("parameters", f"{report['num_parameters']:,}"),
        ("weight files", f"{report['num_shards']} ({report['weights_bytes'] / 2**20:.1f} MiB)"),
        ("logit check", f"{describe(merged['check'], tolerance, dtype)}, {len(inputs)} samples"),
        ("adapter effect", f"{report['adapter_effect_max_abs_logit']:.3g} (max |logit change| vs base)"),
        ("wall time", f"{report['wall_time_s']} s"),
        ("peak memory", report["peak_memory"]),
    ], title="merge summary"))
    return report


if __name__ == "__main__":
    cli(main, Config, __doc__)
