"""Streaming (shard-by-shard, tensor-by-tensor) LoRA merge with bounded memory.

The merge stage's in-memory path loads the whole base model, attaches the adapter and calls peft's
merge_and_unload: memory grows with the model. This path never holds more than one weight tensor of the base (plus
the small adapter): it reads the base's safetensors files tensor by tensor with plain file reads (no mmap, whose
touched pages would count towards the resident set), adds scale * B @ A to each targeted weight exactly as peft
merges it (delta computed in float32 from the float32 adapter, cast to the weight's dtype, added in that dtype), and
writes each tensor straight into the output safetensors file, resharded at max_shard_size. Peak memory is about
the largest tensor (an embedding matrix), not the model.

Supported: plain LoRA on linear layers (including Conv1D-style fan_in_fan_out weights), rsLoRA scaling, rank and
alpha patterns. Refused with a message: DoRA, LoRA biases, modules_to_save, embedding LoRA, layer replication,
other PEFT types, and bases stored only as PyTorch pickles.

The merge stage calls merge() (merge.streaming: auto/true); scripts/tools/bench.py merge measures it against peft.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from hpc_finetune.io.cli import StageError, log
from hpc_finetune.io.files import read_json
from hpc_finetune.model.weights import (
    FLOAT_NAMES,
    TORCH_TO_ST,
    element_size,
    read_header,
    read_tensor,
    weight_files,
    weights_bytes,
    write_safetensors,
)

PREFIX = "base_model.model."
SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
DEFAULT_THRESHOLD_BYTES = 2 * 10**9


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9: max_shard_size read as save_pretrained reads it (huggingface_hub's parser, decimal units), so
    that the streaming and the peft merge shard alike and accept the same settings."""
    from huggingface_hub.serialization._base import parse_size_to_int

    if isinstance(text, int):
        return text
    try:
        return parse_size_to_int(str(text))
    except ValueError:
        raise StageError(f"merge.max_shard_size {text!r} is not a size like 5GB, 500MB or 1.5TB") from None


def choose(setting: str | bool, base_dir: str | os.PathLike, threshold: int = DEFAULT_THRESHOLD_BYTES) -> tuple[bool, str]:
    """Whether to merge by streaming, and why. auto: when the base is sharded or its weights exceed the threshold
    (and it has safetensors weights)."""
    base = Path(base_dir)
    value = str(setting).lower()
    if value in ("true", "false"):
        return value == "true", f"merge.streaming is {value}"
    if value != "auto":
        raise StageError(f"merge.streaming must be auto, true or false, got {setting!r}")
    has_safetensors = (base / "model.safetensors").is_file() or (base / "model.safetensors.index.json").is_file()
    if not has_safetensors:
        return False, "auto: the base has no safetensors weights"
    size = weights_bytes(base)
    sharded = (base / "model.safetensors.index.json").is_file()
    if sharded or size > threshold:
        return True, f"auto: base weights {size / 1e9:.2f} GB{', sharded' if sharded else ''}"
    return False, f"auto: base weights {size / 1e9:.2f} GB, below {threshold / 1e9:g} GB and not sharded"


# --- the adapter ----------------------------------------------------------------------------------------------------


def load_lora(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, dict]]:
    """The adapter config and its LoRA pairs by base weight name: {"model.layers.0.mlp.up_proj.weight":
    {"A": tensor, "B": tensor, "scale": float}}; a StageError for what this merge does not support."""
    import torch

    adapter_dir = Path(adapter_dir)
    config = read_json(adapter_dir / "adapter_config.json", "adapter config")
    unsupported = [
        (config.get("peft_type", "LORA") != "LORA", f"peft_type {config.get('peft_type')} (only LORA)"),
        (config.get("use_dora"), "DoRA (use_dora)"),
        (config.get("lora_bias"), "LoRA biases (lora_bias)"),
        (config.get("modules_to_save"), "modules_to_save"),
        (config.get("layer_replication"), "layer_replication"),
        (config.get("trainable_token_indices"), "trainable_token_indices"),
    ]
    for bad, what in unsupported:
        if bad:
            raise StageError(f"the streaming merge does not support {what}; use merge.streaming: false")
    path = adapter_dir / "adapter_model.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    pairs: dict[str, dict] = {}
    for key, value in state.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX):
            raise StageError(f"adapter weight {key} is not a LoRA A/B matrix of a linear layer; use merge.streaming: false")
        module = key[len(PREFIX):-len(suffix)]
        pairs.setdefault(module + ".weight", {})[SUFFIXES[suffix]] = value.float()
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for weight, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise StageError(f"adapter has only lora_{''.join(pair)} for {weight}")
        module = weight.removesuffix(".weight")
        r = rank_pattern.get(pattern_key(rank_pattern, module), config["r"])
        if pair["A"].shape[0] != r:
            raise StageError(f"{weight}: lora_A has rank {pair['A'].shape[0]}, the adapter config says {r}")
        alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), config["lora_alpha"])
        pair["scale"] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        pair["fan_in_fan_out"] = bool(config.get("fan_in_fan_out"))
    return config, pairs


def pattern_key(patterns: dict, module: str) -> str:
    """peft's rule: a pattern key matches the module name's tail at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def merged_weight(weight, pair: dict, dtype):
    """weight + scale * B @ A in `dtype`, as peft's safe merge computes it on the CPU."""
    import torch

    delta = pair["B"] @ pair["A"]
    if pair["fan_in_fan_out"]:
        delta = delta.T
    delta = delta * pair["scale"]
    if tuple(delta.shape) != tuple(weight.shape):
        raise StageError(f"LoRA delta shape {tuple(delta.shape)} does not match the base weight {tuple(weight.shape)}")
    out = weight.to(dtype)  # a fresh tensor read from the file: adding in place copies nothing
    out += delta.to(dtype)
    if not torch.isfinite(out).all():
        raise StageError("NaN or infinite values in a merged weight: the adapter is broken")
    return out


# --- the merge ------------------------------------------------------------------------------------------------------


def merge(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: Any,
          max_shard_size: str | int = "5GB") -> dict:
    """Write base + adapter into out_dir (safetensors, resharded at max_shard_size, with config.json and
    generation_config.json); return counts and sizes. `dtype` is the torch dtype of floating-point weights."""
    base, out = Path(base_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    _, pairs = load_lora(adapter_dir)
    out_st = TORCH_TO_ST[str(dtype).removeprefix("torch.")]

    # plan: every base tensor, in file order, with its output dtype
    plan: list[tuple[Path, str, dict, int]] = []
    for path in weight_files(base, need_safetensors=True):
        header, data_start = read_header(path)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            plan.append((path, name, info, data_start))
    names = {name for _, name, _, _ in plan}
    missing = sorted(set(pairs) - names)
    if missing:
        raise StageError(f"the adapter targets weights the base does not have: {', '.join(missing[:3])}")

    limit = parse_size(max_shard_size)
    shards: list[list[tuple[Path, str, dict, int, str]]] = [[]]
    size = 0
    for path, name, info, data_start in plan:
        st = out_st if info["dtype"] in FLOAT_NAMES else info["dtype"]
        nbytes = math.prod(info["shape"]) * element_size(st)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((path, name, info, data_start, st))
        size += nbytes


    handles: dict[Path, Any] = {}
    merged = 0
    try:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            lookup = {name: (path, info, data_start) for path, name, info, data_start, _ in shard}

            def produce(name, lookup=lookup):
                nonlocal merged
                path, info, data_start = lookup[name]
                fh = handles.get(path) or handles.setdefault(path, open(path, "rb"))  # noqa: SIM115 - closed below
                tensor = read_tensor(fh, info, data_start)
                if name in pairs:
                    merged += 1
                    return merged_weight(tensor, pairs[name], dtype)
                return tensor.to(dtype) if tensor.is_floating_point() else tensor

            write_safetensors(out / fname, [(n, st, info["shape"]) for _, n, info, _, st in shard], produce)
            for _, name, info, _, st in shard:
                weight_map[name] = fname
                total += math.prod(info["shape"]) * element_size(st)
    finally:
        for fh in handles.values():
            fh.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = read_json(base / "config.json", "base model config")
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (base / "generation_config.json").is_file():
        shutil.copy2(base / "generation_config.json", out / "generation_config.json")
    num_parameters = sum(math.prod(info["shape"]) for _, _, info, _ in plan)
    log.info("streaming merge: %d LoRA pairs into %d tensors, %d shard(s), %.1f s", merged, len(plan), len(shards),
             time.time() - start)
    return {"merged_weights": merged, "tensors": len(plan), "num_shards": len(shards), "num_parameters": num_parameters,
            "largest_tensor_bytes": max(math.prod(i["shape"]) * element_size(i["dtype"]) for _, _, i, _ in plan)}
