"""The two ways of merging: with the whole model in memory (peft's merge_and_unload), and streaming tensor by
tensor (hpc_finetune.merge.streaming) for sharded or large bases. Both record the logits of base+adapter for
the check, loading one model at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpc_finetune.io.cli import StageError, log
from hpc_finetune.merge import streaming
from hpc_finetune.merge.check import describe, exact_logits, judge, logits_of, reference_logits
from hpc_finetune.merge.save import safetensors_to_bin, save_tokenizer, save_weights
from hpc_finetune.model.load import free, load_adapter, load_model
from hpc_finetune.model.params import count_parameters
from hpc_finetune.model.portable import make_portable


def merge_in_memory(
    base_dir: str, adapter_dir: str, dtype: Any, inputs: list[list[int]], save: Callable[[Any], None]
) -> dict:
    """Merge with the whole model in memory: load the base unquantised, attach the adapter, record the logits of
    base and base+adapter, merge_and_unload, record the merged logits, and hand the merged model to `save`.
    For a 16-bit dtype, base+adapter is first run in float32 too (one model in memory at a time): the exact
    function, against which the 16-bit rounding error is measured (see `judge`).

    merge_streamed is the bounded-memory alternative (see hpc_finetune.merge.streaming)."""
    exact = exact_logits(base_dir, adapter_dir, dtype, inputs)
    base = load_model(base_dir, dtype, "base model")
    model = load_adapter(base, adapter_dir)
    reference, adapter_effect = reference_logits(model, inputs)
    merged = model.merge_and_unload(safe_merge=True)
    merged_logits = logits_of(merged, inputs)
    num_parameters = count_parameters(merged)[1]
    save(merged)
    del merged, model, base
    free()
    return {
        "reference_logits": reference,
        "exact_logits": exact,
        "merged_logits": merged_logits,
        "adapter_effect": adapter_effect,
        "num_parameters": num_parameters,
    }


def merge_streamed(
    base_dir: str, adapter_dir: str, dtype: Any, inputs: list[list[int]], directory: Path, fmt: str,
    max_shard_size: str,
) -> dict:
    """The bounded-memory merge: the reference logits come from base+adapter loaded once (one model in memory at a
    time, on the GPUs when there are any), then the streaming merge writes the merged weights tensor by tensor, never
    holding the model. Same keys as merge_in_memory; no in-memory merged logits (merged_logits None): the stage's
    check of the reloaded model is the check."""
    exact = exact_logits(base_dir, adapter_dir, dtype, inputs)
    model = load_adapter(load_model(base_dir, dtype, "base model"), adapter_dir)
    reference, adapter_effect = reference_logits(model, inputs)
    del model
    free()
    stats = streaming.merge(base_dir, adapter_dir, directory, dtype, max_shard_size)
    if fmt == "bin":
        safetensors_to_bin(directory)
    return {
        "reference_logits": reference,
        "exact_logits": exact,
        "merged_logits": None,
        "adapter_effect": adapter_effect,
        "num_parameters": stats["num_parameters"],
    }


def merge_and_check(base_dir: str, adapter_dir: str, tokenizer: Any, dtype: Any, inputs: list[list[int]], tmp: Path,
                    fmt: str, max_shard_size: str, use_streaming: bool, tolerance: float, output: Path) -> dict:
    """Merge into `tmp` (weights, tokenizer, transformers-4 keys), reload the result from disk and check its logits
    against base+adapter; a StageError when they differ. Returns the merge's result, the check and the keys added
    for transformers-4 readers."""
    if use_streaming:
        result = merge_streamed(base_dir, adapter_dir, dtype, inputs, tmp, fmt, max_shard_size)
    else:
        result = merge_in_memory(base_dir, adapter_dir, dtype, inputs,
                                 save=lambda model: save_weights(model, tmp, fmt, max_shard_size))
    save_tokenizer(tokenizer, tmp, adapter_dir, base_dir)
    portable = make_portable(tmp)  # before the reload check: what is checked is what is shipped
    if result["adapter_effect"] == 0:
        log.warning("the adapter does not change the base model's logits at all (untrained LoRA weights?)")
    log.info("reloading the merged model from disk to check it")
    reloaded = load_model(tmp, dtype, "merged model")
    logits = logits_of(reloaded, inputs)
    del reloaded
    free()
    check = judge(result, logits, tolerance)
    if not check["passed"]:
        raise StageError(f"the merged model does not reproduce base+adapter: {describe(check, tolerance, dtype)};"
                         f" nothing was written to {output}")
    return {"result": result, "check": check, "portable": portable}
