"""GPU preflight: what the GPUs are, how much memory one training process needs (counted on the meta device: no
weights are loaded), whether the LoRA targets exist in the model, and whether the job fits. The estimate counts
quantisable linear layers at 4/8/16 bits, embeddings and head at 16 bits, LoRA weights with fp32 grads and Adam
states, checkpointed activations, fp32 logits, and the CUDA context. No heavy imports at module level.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from hpc_finetune.io.cli import StageError, log
from hpc_finetune.model.params import count_parameters

MIB = 2**20
BYTES_PER_QUANTISED_PARAM = {"4bit": 0.5 + 0.5 / 64 * 1.03, "8bit": 1.0 + 4 / 4096}  # nf4 + double-quant scales
CUDA_CONTEXT_BYTES = 900 * MIB


def model_parameters(model_path: str, target_modules: str | list[str]) -> dict:
    """Split the model's parameters into quantisable linear weights, the rest, and LoRA (in + out) * r units."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_targets(model, target_modules, model_path)
    head = model.get_output_embeddings()
    linear_params = lora_units = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        linear_params += module.weight.numel()
        leaf = name.rsplit(".", 1)[-1]
        if target_modules == "all-linear" or leaf in target_modules:
            lora_units += module.in_features + module.out_features
    total = count_parameters(model)[1]
    text_config = config.get_text_config()
    return {
        "total": total,
        "quantisable": linear_params,
        "other": total - linear_params,
        "lora_units": lora_units,
        "hidden_size": text_config.hidden_size,
        "intermediate_size": getattr(text_config, "intermediate_size", 4 * text_config.hidden_size),
        "num_layers": text_config.num_hidden_layers,
        "vocab_size": text_config.vocab_size,
        "decoder_layer_classes": list(getattr(model, "_no_split_modules", None) or []),  # what FSDP wraps
    }


def check_targets(model, target_modules: str | list[str], model_path: str) -> None:
    """Every name in training.target_modules must name modules of the model, as PEFT matches them (the full name
    or its last parts): PEFT itself fails only when none matches, and silently skips a misspelt one."""
    import torch

    if target_modules == "all-linear":
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        head = model.get_output_embeddings()
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) and module is not head})
        verb = "matches" if len(missing) == 1 else "match"
        raise StageError(
            f"training.target_modules: {', '.join(map(repr, missing))} {verb} no module of the model {model_path}. "
            f"Its linear layers are named {', '.join(linear)}; list some of them, or set training.target_modules "
            "to all-linear"
        )


def estimate_memory(params: dict, cfg: Any, bf16: bool) -> dict:
    """Bytes one training process needs on its device, by part. An estimate for planning, not a guarantee."""
    half = 2 if bf16 else 4
    per_param = BYTES_PER_QUANTISED_PARAM.get(cfg.quantization, half)
    tokens = cfg.micro_batch_size * cfg.max_seq_length
    hidden, inter, layers = params["hidden_size"], params["intermediate_size"], params["num_layers"]
    layer_activations = tokens * (10 * hidden + 4 * inter) * half  # one layer's saved tensors (SDPA: no s^2)
    if cfg.gradient_checkpointing:
        activations = layers * tokens * hidden * half + layer_activations
    else:
        activations = layers * layer_activations
    lora = params["lora_units"] * cfg.lora_r
    parts = {
        "base_weights": params["quantisable"] * per_param + params["other"] * half,
        "lora_weights_grads_optimizer": lora * (4 + 4 + 8),
        "activations": activations,
        "logits_fp32": 2 * tokens * params["vocab_size"] * 4,
        "cuda_context": CUDA_CONTEXT_BYTES,
    }
    parts["allocator_slack"] = 0.1 * sum(parts.values())
    return {name: round(value / MIB) for name, value in parts.items()} | {
        "total_mb": round(sum(parts.values()) / MIB),
        "lora_parameters": lora,
    }


def gpu_report() -> dict:
    import torch

    report = {
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": [],
    }
    if not report["cuda_available"]:
        return report
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        report["gpus"].append(
            {
                "index": index,
                "name": props.name,
                "memory_mb": round(props.total_memory / MIB),
                "capability": f"{props.major}.{props.minor}",
                "bf16": props.major >= 8,
            }
        )
    report["driver_version"] = nvidia_driver()
    return report


def nvidia_driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    result = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    )
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def decide(cfg: Any, report: dict, params: dict) -> str:
    """'cuda' or 'cpu', or a StageError that says why the job cannot run here."""
    total = params["total"]
    if report["gpus"] and cfg.device != "cpu":
        return "cuda"
    if cfg.device == "gpu":
        raise StageError(
            "preflight.device is gpu but no GPU is visible (CUDA_VISIBLE_DEVICES="
            f"{report['visible_devices']}). Run on a GPU node (profiles/slurm), or pass --nv to the container."
        )
    if total > cfg.cpu_max_params:
        raise StageError(
            f"no GPU is visible and the model has {total / 1e9:.2f}B parameters; training on the CPU is allowed "
            f"only up to {cfg.cpu_max_params:,} (preflight.cpu_max_params). Run on a GPU node (profiles/slurm), "
            "or check CUDA_VISIBLE_DEVICES and the container's --nv."
        )
    log.warning("no GPU visible: the %s-parameter model will train on the CPU", f"{total:,}")
    return "cpu"


def plannable_mb(gpus: list[dict], fraction: float) -> tuple[int, dict]:
    """(MiB that may be planned on the smallest visible GPU, that GPU)."""
    smallest = min(gpus, key=lambda g: g["memory_mb"])
    return round(smallest["memory_mb"] * fraction), smallest


def fit_tips(cfg: Any) -> str:
    return (f"To fit: training.quantization 4bit (now {cfg.quantization}), a smaller training.micro_batch_size (now "
            f"{cfg.micro_batch_size}) with more gradient_accumulation, training.gradient_checkpointing true (now "
            f"{str(cfg.gradient_checkpointing).lower()}), or a shorter training.max_seq_length "
            f"(now {cfg.max_seq_length}).")


def check_fit(estimate: dict, gpus: list[dict], fraction: float, cfg: Any) -> int:
    """Refuse a job whose estimate exceeds the smallest visible GPU's budget. Returns the budget in MiB."""
    budget, smallest = plannable_mb(gpus, fraction)
    if estimate["total_mb"] > budget:
        parts = ", ".join(f"{k} {v} MiB" for k, v in estimate.items() if k not in ("total_mb", "lora_parameters"))
        raise StageError(
            f"the job needs about {estimate['total_mb']} MiB per GPU but GPU {smallest['index']} "
            f"({smallest['name']}) has {smallest['memory_mb']} MiB, of which {budget} MiB may be planned "
            f"(preflight.memory_fraction {fraction}). Parts: {parts}. {fit_tips(cfg)}"
        )
    return budget
