"""The speed levers of the train stage and how each maps to TRL's SFTConfig or to the model loading:
attention kernel, padding-free batches, gradient checkpointing modes, torch.compile, Liger kernels,
dataloader workers and pinning. README "Performance" gives the measurements behind the defaults;
scripts/tools/bench.py measures them. No heavy imports at module level.
"""

from __future__ import annotations

from typing import Any

from hpc_finetune.io.cli import StageError

ATTENTION = ("auto", "sdpa", "flash_attention_2", "flash_attention_3", "eager")
CHECKPOINTING_MODES = ("non_reentrant", "reentrant", "offload")


def attention_implementation(choice: str, cpu: bool, bf16: bool = True) -> str:
    """The attention kernel: auto takes flash_attention_2 where flash-attn is installed and a GPU trains in bf16
    (flash-attn has no float32 kernels), else PyTorch's SDPA (fused on GPUs; transformers masks padding-free and
    packed rows correctly with it)."""
    import importlib.util

    if choice not in ATTENTION:
        raise StageError(f"training.attn_implementation must be one of {', '.join(ATTENTION)}, got {choice!r}")
    if choice == "auto":
        return "flash_attention_2" if not cpu and bf16 and importlib.util.find_spec("flash_attn") else "sdpa"
    if choice.startswith("flash") and cpu:
        raise StageError(f"training.attn_implementation {choice} needs a GPU; use sdpa or auto on the CPU")
    if choice == "flash_attention_2" and not importlib.util.find_spec("flash_attn"):
        raise StageError("training.attn_implementation flash_attention_2 needs the flash-attn package; use auto or sdpa")
    return choice


def resolve_padding_free(value: bool | str, attention: str) -> bool:
    """auto: padding-free only with flash attention, whose varlen kernel attends within each row. With sdpa/eager
    the rows of a flattened micro-batch stay apart through a block mask over the whole flattened sequence, whose
    cost grows with its square: slower than padding there (measured: half the tokens/s on the demo)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    if str(value).lower() == "auto":
        return attention.startswith("flash")
    raise StageError(f"training.padding_free must be true, false or auto, got {value!r}")


def speed_settings(cfg: Any, *, cpu: bool, new_name: bool, attention: str = "sdpa") -> dict:
    """The SFTConfig arguments of the speed levers (padding-free batches, checkpointing mode, torch.compile, Liger,
    dataloader); the attention kernel (`attention`, resolved) goes to the model loading (model_init_kwargs)."""
    import importlib.util

    if cfg.gradient_checkpointing_mode not in CHECKPOINTING_MODES:
        raise StageError(f"training.gradient_checkpointing_mode must be one of {', '.join(CHECKPOINTING_MODES)}, got "
                         f"{cfg.gradient_checkpointing_mode!r}")
    if cfg.liger_kernels and (cpu or not importlib.util.find_spec("liger_kernel")):
        raise StageError("training.liger_kernels needs the liger-kernel package and a GPU (it is not in the pinned "
                         "stack: pip install liger-kernel where triton works); set it to false")
    kwargs = {"use_reentrant": cfg.gradient_checkpointing_mode == "reentrant"}
    if cfg.gradient_checkpointing_mode == "offload":
        kwargs["offload"] = True
    if cfg.gradient_checkpointing_every_n_layers > 1:
        kwargs["every_n_layers"] = cfg.gradient_checkpointing_every_n_layers
    name = "activation_checkpointing" if new_name else "gradient_checkpointing"
    settings = {
        name: cfg.gradient_checkpointing,
        f"{name}_kwargs": kwargs if cfg.gradient_checkpointing else None,
        "padding_free": resolve_padding_free(cfg.padding_free, attention),
        "torch_compile": cfg.torch_compile,
        "dataloader_num_workers": cfg.dataloader_num_workers,
        "dataloader_pin_memory": cfg.dataloader_pin_memory and not cpu,
        "dataloader_persistent_workers": cfg.dataloader_num_workers > 0,
    }
    if cfg.liger_kernels:  # layer kernels only: TRL 1.16 keeps its own fused (chunked) LM-head loss
        settings.update(use_liger_kernel=True, liger_kernel_config={"rms_norm": True, "rope": True, "swiglu": True,
                                                                    "cross_entropy": False})
    if settings["padding_free"] and not cfg.packing:
        # TRL will not cut padding-free rows at max_length; the data stage already enforces it (dataset.long_rows)
        settings["max_length"] = None
    return settings
