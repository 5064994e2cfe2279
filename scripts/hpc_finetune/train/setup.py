"""The trainer of the train stage: the workflow's training keys mapped to TRL's SFTConfig in one place, TRL's
SFTTrainer loading, quantising and wrapping the model with the LoRA adapter, and the 4-bit layers kept trainable
before the first forward pass. No heavy imports at module level.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hpc_finetune.io.cli import StageError, log
from hpc_finetune.io.files import write_json
from hpc_finetune.model.params import count_parameters
from hpc_finetune.train.control import adapter_into_checkpoints
from hpc_finetune.train.quantized import keep_trainable, packed_layout_guard, quantization_config
from hpc_finetune.train.speed import attention_implementation, speed_settings
from hpc_finetune.train.strategy import SHARDED, deepspeed_config, fsdp_config


def resolve_bf16(value: bool | str, preflight: dict) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() == "auto":
        return bool(preflight.get("bf16", False))
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise StageError(f"training.bf16 must be true, false or auto, got {value!r}")


def strategy_settings(cfg: Any, run_dir: Path, strategy: dict | None) -> dict:
    """The SFTConfig arguments of the strategy: FSDP through transformers' fsdp/fsdp_config (Accelerate's FSDP
    plugin), DeepSpeed through a generated ZeRO config (also written to the run directory, deepspeed.json)."""
    name = (strategy or {}).get("name", "single")
    if name == "fsdp":
        return {"fsdp": True, "fsdp_config": fsdp_config(strategy.get("decoder_layer_classes"), cfg.cpu_offload)}
    if name == "deepspeed":
        import importlib.util

        if not importlib.util.find_spec("deepspeed"):
            raise StageError("training.strategy deepspeed needs the deepspeed package, which the pinned stack leaves "
                             "out (an sdist built against the GPU's CUDA; 0.19.8 builds here with DS_BUILD_OPS=0): "
                             "install it where training runs, or use training.strategy fsdp")
        config = deepspeed_config(cfg.zero_stage, cfg.cpu_offload)
        if int(os.environ.get("RANK", 0)) == 0:
            write_json(run_dir / "deepspeed.json", config)
        return {"deepspeed": config}
    return {}


def sft_config(cfg: Any, run_dir: Path, *, cpu: bool, bf16: bool, has_eval: bool, resuming: bool, mode: str,
               trust_remote_code: bool, strategy: dict | None = None):
    """The SFTConfig for the settings: one place that maps the workflow's keys to TRL's."""
    import torch
    from trl import SFTConfig

    save_steps = cfg.save_steps
    early_stopping = bool(cfg.early_stopping_patience) and has_eval
    if cfg.early_stopping_patience and not has_eval:
        log.warning("early_stopping_patience is set but there is no eval data: early stopping is off")
    if early_stopping and save_steps % cfg.eval_steps:
        log.warning("early stopping needs save_steps to be a multiple of eval_steps: saving every %d steps",
                    cfg.eval_steps)
        save_steps = cfg.eval_steps
    # transformers 5.23 calls it activation_checkpointing; older releases only know gradient_checkpointing
    new_name = "activation_checkpointing" in SFTConfig.__dataclass_fields__
    attention = attention_implementation(cfg.attn_implementation, cpu, bf16)
    speed = speed_settings(cfg, cpu=cpu, new_name=new_name, attention=attention)
    settings = dict(
        output_dir=str(run_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=min(cfg.warmup_ratio, 0.999),  # a float below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        max_length=cfg.max_seq_length,
        bf16=bf16,
        packing=cfg.packing,
        optim=cfg.optim,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # True logs a NaN run's loss as 0.0 once every step is NaN
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        eval_on_start=has_eval and not resuming,  # the baseline eval loss; a resumed run has it in its history
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss" if early_stopping else None,
        greater_is_better=False if early_stopping else None,
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every forward pass
        report_to=["tensorboard"],
        include_num_input_tokens_seen="non_padding",
        use_cpu=cpu,
        disable_tqdm=not sys.stderr.isatty(),
        assistant_only_loss=mode == "assistant_only",
        completion_only_loss=mode == "completion_only",
        model_init_kwargs={
            "dtype": torch.bfloat16 if bf16 else torch.float32,
            # FSDP and DeepSpeed place (and shard) the model themselves: no device map
            **({} if (strategy or {}).get("name") in SHARDED else
               {"device_map": "cpu" if cpu else {"": int(os.environ.get("LOCAL_RANK", 0))}}),
            "trust_remote_code": trust_remote_code,
            "attn_implementation": attention,
        },
    )
    return SFTConfig(**{**settings, **speed, **strategy_settings(cfg, run_dir, strategy)})


def trainer_class(args, cpu: bool):
    """SFTTrainer; for FSDP on the CPU (the tests' gloo runs) one that keeps the FSDP plugin: Accelerate turns
    FSDP on only for accelerator devices and, on the CPU, silently trains plain DDP instead. PyTorch's FSDP2 runs
    on gloo; the plugin, the wrapping and the sharded checkpoints are Accelerate's and transformers' own."""
    from trl import SFTTrainer

    if not (cpu and args.fsdp_plugin_args):
        return SFTTrainer

    class CPUFSDPTrainer(SFTTrainer):
        def create_accelerator_and_postprocess(self):
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            if state.distributed_type == DistributedType.MULTI_CPU:
                state.distributed_type = DistributedType.FSDP
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                self.is_fsdp_enabled = True

    return CPUFSDPTrainer


def build_trainer(cfg: Any, model_path: str, args, tokenizer, train_ds, eval_ds, callbacks: list):
    """TRL loads and quantises the model, wraps it with the adapter once, freezes the base, enables input
    gradients for checkpointing and keeps the adapter in bf16 on quantised models. No separate
    prepare_model_for_kbit_training: TRL dropped it, it would upcast embeddings and norms to fp32."""
    from unittest import mock

    from peft import LoraConfig
    from transformers import EarlyStoppingCallback, PrinterCallback

    if args.load_best_model_at_end:
        callbacks = [*callbacks, EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)]
    peft_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    # transformers' TensorBoardCallback takes its directory from this variable when the trainer is built
    with mock.patch.dict(os.environ, {"TENSORBOARD_LOGGING_DIR": cfg.tensorboard_dir}):
        trainer = trainer_class(args, args.use_cpu)(
            model=model_path,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            quantization_config=quantization_config(cfg.quantization, args.model_init_kwargs["dtype"],
                                                    sharded=bool(args.fsdp or args.deepspeed)),
            callbacks=callbacks,
        )
    trainer.remove_callback(PrinterCallback)  # the Progress callback writes the log lines instead
    if trainer.is_fsdp_enabled:
        trainer.add_callback(adapter_into_checkpoints())
    # Before any forward pass: evaluations must not repack 4-bit weights into the CPU layout without a backward.
    if layers := keep_trainable(trainer.model):
        log.info("%d 4-bit layers kept in the trainable layout (no CPU inference repack on evaluation)", layers)
        trainer.add_callback(packed_layout_guard())
    return trainer


def check_trainable(trainer) -> tuple[int, int]:
    """(trainable, total) parameters; 0 trainable is the silent failure of a frozen adapter: stop before training."""
    trainable, total = count_parameters(trainer.model)
    if trainable == 0:
        raise StageError(
            "the model has 0 trainable parameters: the LoRA adapter was not attached or was frozen, so training "
            "would run and learn nothing. Check target_modules against the model's module names."
        )
    return trainable, total
