"""How training spreads over the job's GPUs (training.strategy): the memory per GPU of each strategy, from the
preflight estimate of one process; the choice `auto` makes from it and the job's GPU count; and what each sharded
strategy hands to the engines that do the work: the `fsdp_config` of transformers' TrainingArguments (PyTorch FSDP
through Accelerate, the PEFT "FSDP + QLoRA" recipe) and a DeepSpeed ZeRO config for TrainingArguments(deepspeed=).
Pure functions, no heavy imports: preflight and the tests call them.

The per-strategy figures are estimates for planning (README "Several GPUs"):
- single, ddp: one process holds the whole (quantised) model, its LoRA weights, gradients and Adam states, its
  activations and logits (the preflight estimate).
- fsdp, deepspeed ZeRO-3: weights, LoRA gradients and optimizer states are split over the world; each GPU also
  holds the decoder layer being computed and the next one (gathered whole, prefetch), and its own activations.
  With cpu_offload only the gathered layers and the activations stay on the GPU.
- deepspeed ZeRO-2: every GPU keeps all weights; gradients and optimizer states are split (offloaded to the host
  with cpu_offload).
"""

from __future__ import annotations

from typing import Any

from hpc_finetune.io.cli import StageError

STRATEGIES = ("auto", "single", "ddp", "fsdp", "deepspeed")
SHARDED = ("fsdp", "deepspeed")
SLACK = 0.1  # the allocator's fragmentation, as in the preflight estimate
MAX_GPUS = 4096  # the search for "how many GPUs would it need" stops here


def per_gpu_mb(estimate: dict, layers: int, strategy: str, world: int, offload: bool = False,
               zero_stage: int = 3) -> int:
    """MiB one GPU needs under `strategy` with `world` GPUs, from the preflight estimate of one process
    (hpc_finetune.train.preflight.estimate_memory, in MiB by part)."""
    weights = estimate["base_weights"]
    lora = estimate["lora_weights_grads_optimizer"]  # weights 4 + grads 4 + Adam 8 bytes per LoRA parameter
    rest = estimate["activations"] + estimate["logits_fp32"] + estimate["cuda_context"]
    gathered = 2 * weights / max(layers, 1)  # the layer computed and the one prefetched, whole
    if strategy in ("single", "ddp"):
        need = weights + lora + rest
    elif strategy == "fsdp" or (strategy == "deepspeed" and zero_stage == 3):
        need = gathered + rest if offload else weights / world + lora / world + gathered + rest
    elif strategy == "deepspeed":  # ZeRO-2: weights whole, LoRA gradients and Adam states split (or on the host)
        need = weights + lora / 4 + rest if offload else weights + lora / 4 + 3 * lora / 4 / world + rest
    else:
        raise StageError(f"training.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return round(need * (1 + SLACK))


def table(estimate: dict, layers: int, world: int, zero_stage: int = 3) -> dict[str, dict[str, int]]:
    """MiB per GPU of every strategy for `world` GPUs, with and without CPU offload (the preflight report)."""
    rows = {}
    for strategy in STRATEGIES[1:]:
        n = 1 if strategy == "single" else world
        rows[strategy] = {"gpus": n, "mb_per_gpu": per_gpu_mb(estimate, layers, strategy, n, False, zero_stage)}
        if strategy in SHARDED:
            rows[strategy]["mb_per_gpu_cpu_offload"] = per_gpu_mb(estimate, layers, strategy, n, True, zero_stage)
    return rows


def gpus_needed(estimate: dict, layers: int, strategy: str, budget_mb: int, offload: bool = False,
                zero_stage: int = 3) -> int | None:
    """The fewest GPUs of `budget_mb` each on which the sharded `strategy` fits; None when no number does."""
    for n in range(1, MAX_GPUS + 1):
        if per_gpu_mb(estimate, layers, strategy, n, offload, zero_stage) <= budget_mb:
            return n
        if n > 1 and per_gpu_mb(estimate, layers, strategy, n, offload, zero_stage) == per_gpu_mb(
                estimate, layers, strategy, n * 2, offload, zero_stage):
            return None  # what does not shard (activations, gathered layers) is already too big
    return None


def choose(requested: str, *, world: int, device: str, quantization: str, estimate: dict | None = None,
           layers: int = 1, budget_mb: int | None = None, offload: bool = False, zero_stage: int = 3) -> tuple[str, str]:
    """(strategy, why) for training.strategy `requested` on `world` processes; a StageError when the job cannot
    run: nothing fits the GPUs (with the GPUs it would need, or the offload key that would fit), or a sharded
    strategy on the CPU with a quantised model."""
    if requested not in STRATEGIES:
        raise StageError(f"training.strategy must be one of {', '.join(STRATEGIES)}, got {requested!r}")
    if requested == "single" and world > 1:
        raise StageError(f"training.strategy single trains one process, but the job starts {world} (resources.gpus "
                         "x resources.nodes, or resources.processes_per_node): set resources.gpus 1, or strategy ddp")
    if device != "cuda":
        return _on_cpu(requested, world, quantization)
    fits = {s: per_gpu_mb(estimate, layers, s, world, offload and s in SHARDED, zero_stage) <= budget_mb
            for s in STRATEGIES[1:]}
    if requested == "auto":
        if world <= 1 and fits["single"]:
            return "single", "one GPU"
        if world > 1 and fits["ddp"]:
            return "ddp", f"a full copy fits on each of the {world} GPUs"
        if world > 1 and fits["fsdp"]:
            return "fsdp", f"a full copy does not fit one GPU; sharded over {world} GPUs it does"
        if world <= 1 and fits["fsdp"] and offload:
            return "fsdp", "only with training.cpu_offload on this one GPU"
        raise StageError(_does_not_fit("auto", estimate, layers, world, budget_mb, offload, zero_stage))
    if not fits[requested]:
        raise StageError(_does_not_fit(requested, estimate, layers, world, budget_mb, offload, zero_stage))
    return requested, "as configured"


def _on_cpu(requested: str, world: int, quantization: str) -> tuple[str, str]:
    if requested in SHARDED and quantization != "none":
        raise StageError(
            f"training.strategy {requested} with training.quantization {quantization} needs GPUs: bitsandbytes' CPU "
            "kernels need the 4/8-bit weights stored as uint8 and do not run sharded. On the CPU use "
            "training.quantization none (FSDP with plain LoRA), or strategy ddp"
        )
    if requested == "deepspeed":
        raise StageError("training.strategy deepspeed needs GPUs (DeepSpeed's CPU backend is not in the stack); on "
                         "the CPU use fsdp or ddp")
    if requested == "auto":
        return ("ddp", f"{world} CPU processes") if world > 1 else ("single", "one CPU process")
    return requested, "as configured"


def _does_not_fit(requested: str, estimate: dict, layers: int, world: int, budget_mb: int, offload: bool,
                  zero_stage: int) -> str:
    need = {s: per_gpu_mb(estimate, layers, s, world, offload, zero_stage) for s in ("ddp", "fsdp")}
    message = (f"training.strategy {requested}: the job does not fit its {world} GPU(s) of {budget_mb} MiB plannable "
               f"each (estimate per GPU: ddp {need['ddp']} MiB, fsdp {need['fsdp']} MiB"
               f"{' with cpu_offload' if offload else ''}).")
    gpus = gpus_needed(estimate, layers, "fsdp", budget_mb, offload, zero_stage)
    if gpus:
        message += (f" With training.strategy fsdp (or auto) it needs {gpus} GPUs of this size: resources.gpus x "
                    f"resources.nodes >= {gpus}.")
    if not offload and per_gpu_mb(estimate, layers, "fsdp", world, True, zero_stage) <= budget_mb:
        message += (f" CPU offload would fit on these {world} GPU(s) (estimate "
                    f"{per_gpu_mb(estimate, layers, 'fsdp', world, True, zero_stage)} MiB per GPU): set "
                    "training.cpu_offload true with training.strategy fsdp (slower).")
    if not gpus and (offload or per_gpu_mb(estimate, layers, "fsdp", world, True, zero_stage) > budget_mb):
        message += (" Sharding cannot help: the activations alone are too big; lower training.micro_batch_size or "
                    "training.max_seq_length, or turn on training.gradient_checkpointing.")
    return message


# --- what the engines get -----------------------------------------------------------------------------------


def fsdp_config(layer_classes: list[str] | None, offload: bool) -> dict[str, Any]:
    """TrainingArguments.fsdp_config for FSDP + (Q)LoRA, after the PEFT/Accelerate recipe: FSDP2 (transformers 5's
    default; its per-parameter sharding replaces FSDP1's flat parameters, so `use_orig_params: false` has no
    counterpart), wrapped by decoder layer, the model loaded on rank 0 only and broadcast
    (cpu_ram_efficient_loading), sharded checkpoints (each rank writes its shard: a stopped run resumes without
    gathering), parameters and optimizer state on the host with `offload`."""
    config: dict[str, Any] = {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "SHARDED_STATE_DICT",
        "cpu_ram_efficient_loading": True,
        "reshard_after_forward": True,
        "cpu_offload": offload,
    }
    if layer_classes:
        config["transformer_layer_cls_to_wrap"] = list(layer_classes)
    return config


def deepspeed_config(zero_stage: int, offload: bool) -> dict[str, Any]:
    """A DeepSpeed ZeRO config for TrainingArguments(deepspeed=...): batch sizes, accumulation, clipping and
    precision left "auto" (transformers fills them from the training arguments, so they cannot disagree), the
    16-bit weights gathered on save under ZeRO-3 (the adapter is saved whole), optimizer (and ZeRO-3 parameter)
    offload to the host with `offload` (ZeRO-2 + optimizer offload is the FinSight setting)."""
    if zero_stage not in (2, 3):
        raise StageError(f"training.zero_stage must be 2 or 3, got {zero_stage!r}")
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=True)
    else:
        zero.update(allgather_partitions=True, reduce_scatter=True)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }


def shards(strategy: str, world: int, zero_stage: int = 3) -> str:
    """What the setup table says about sharding."""
    if strategy == "fsdp":
        return f"weights, gradients, optimizer state in {world} shards (FSDP)"
    if strategy == "deepspeed":
        what = "weights, gradients, optimizer state" if zero_stage == 3 else "gradients, optimizer state"
        return f"{what} in {world} shards (DeepSpeed ZeRO-{zero_stage})"
    return "none: a full copy per process" if world > 1 else "none"
