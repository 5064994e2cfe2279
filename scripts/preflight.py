"""GPU preflight: report the GPUs, estimate the memory the training job needs, check the LoRA targets against the
model, choose how training spreads over the job's GPUs (training.strategy), and refuse a job that won't fit,
before a long job is queued.

    python scripts/preflight.py --model-json results/run/model/model.json --quantization 4bit \
        --max-seq-length 2048 --micro-batch-size 1 --gradient-checkpointing true --output results/run/preflight.json

hpc_finetune.train.preflight holds the estimate and the checks, hpc_finetune.train.strategy the estimate per
strategy and the choice; the report's `strategy` section says which one the train job uses, and why. Without a GPU, only a small model (the demo) may
go on to train on the CPU; anything bigger stops here with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.io.cli import StageError, cli, log, table
from hpc_finetune.io.files import model_dir, write_json
from hpc_finetune.io.schema import option
from hpc_finetune.train import strategy as strategies
from hpc_finetune.train.preflight import (
    decide,
    estimate_memory,
    fit_tips,
    gpu_report,
    model_parameters,
    plannable_mb,
)


@dataclass
class Config:
    model_json: str = field(metadata={"help": "model record from the model stage"})
    output: str = field(metadata={"help": "preflight report to write (JSON)"})
    quantization: str = option("training.quantization")
    max_seq_length: int = option("training.max_seq_length")
    micro_batch_size: int = option("training.micro_batch_size")
    gradient_checkpointing: bool = option("training.gradient_checkpointing")
    lora_r: int = option("training.lora_r")
    target_modules: str | list[str] = option("training.target_modules")
    bf16: str | bool = option("training.bf16")
    device: str = option("preflight.device")
    cpu_max_params: int = option("preflight.cpu_max_params")
    memory_fraction: float = option("preflight.memory_fraction")
    strategy: str = option("training.strategy")
    cpu_offload: bool = option("training.cpu_offload")
    zero_stage: int = option("training.zero_stage")
    gpus: int = option("resources.gpus")
    nodes: int = option("resources.nodes")
    processes_per_node: int = option("resources.processes_per_node")


def world_size(cfg: Config) -> int:
    """Training processes the train job starts (as scripts/launch.py counts them): per node the override, else
    one per GPU (one without GPUs), times the nodes."""
    per_node = cfg.processes_per_node if cfg.processes_per_node > 0 else max(cfg.gpus, 1)
    return cfg.nodes * per_node


def choose_strategy(cfg: Config, device: str, estimate: dict, params: dict, gpus: list[dict]) -> dict:
    """The strategy section of the report: what was asked, what the train job uses and why, and the estimate per
    GPU of every strategy for this job's world size."""
    world = world_size(cfg)
    budget = plannable_mb(gpus, cfg.memory_fraction)[0] if device == "cuda" else None
    layers = params["num_layers"]
    try:
        chosen, why = strategies.choose(cfg.strategy, world=world, device=device, quantization=cfg.quantization,
                                        estimate=estimate, layers=layers, budget_mb=budget,
                                        offload=cfg.cpu_offload, zero_stage=cfg.zero_stage)
    except StageError as err:
        raise StageError(f"{err} {fit_tips(cfg)}" if device == "cuda" else str(err)) from None
    return {"requested": cfg.strategy, "chosen": chosen, "why": why, "world_size": world,
            "cpu_offload": cfg.cpu_offload, "zero_stage": cfg.zero_stage, "budget_mb_per_gpu": budget,
            "decoder_layer_classes": params["decoder_layer_classes"],
            "per_gpu_mb": strategies.table(estimate, layers, world, cfg.zero_stage)}


def main(cfg: Config) -> dict:
    path = model_dir(cfg.model_json)
    if not Path(path, "config.json").is_file():
        raise StageError(f"model {path} has no config.json; re-run the model stage")
    report = gpu_report()
    params = model_parameters(path, cfg.target_modules)
    device = decide(cfg, report, params)
    gpus_bf16 = bool(report["gpus"]) and all(g["bf16"] for g in report["gpus"])
    bf16 = gpus_bf16 if cfg.bf16 == "auto" else bool(cfg.bf16)
    if bf16 and device == "cuda" and not gpus_bf16:
        raise StageError("training.bf16 is true but a visible GPU has no bfloat16 support; set it to auto or false")
    estimate = estimate_memory(params, cfg, bf16)
    strategy = choose_strategy(cfg, device, estimate, params, report["gpus"])
    budget = strategy["budget_mb_per_gpu"]
    result = {
        "device": device,
        "bf16": bf16,
        **report,
        "model": {k: params[k] for k in ("total", "quantisable", "other")},
        "settings": {
            "quantization": cfg.quantization,
            "max_seq_length": cfg.max_seq_length,
            "micro_batch_size": cfg.micro_batch_size,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "lora_r": cfg.lora_r,
        },
        "estimate_mb": estimate,
        "budget_mb": budget,
        "strategy": strategy,
        "host": {"cpus": os.cpu_count(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")},
    }
    write_json(cfg.output, result)
    rows = [("device", device), ("bf16", bf16), ("parameters", f"{params['total']:,}")]
    rows += [(f"GPU {g['index']}", f"{g['name']} {g['memory_mb']} MiB cc {g['capability']}") for g in report["gpus"]]
    rows += [("estimate", f"{estimate['total_mb']} MiB per process"), ("budget", f"{budget} MiB" if budget else "-")]
    for name, row in strategy["per_gpu_mb"].items():
        offload = row.get("mb_per_gpu_cpu_offload")
        rows.append((f"estimate {name}", f"{row['mb_per_gpu']} MiB per GPU on {row['gpus']}"
                                         + (f" ({offload} with cpu_offload)" if offload is not None else "")))
    rows.append(("strategy", f"{strategy['chosen']} (training.strategy {cfg.strategy}: {strategy['why']}; world size "
                             f"{strategy['world_size']})"))
    log.info("\n%s", table(rows, "Preflight"))
    return result


if __name__ == "__main__":
    cli(main, Config, __doc__)
