r"""Train stage: supervised fine-tuning of the base model with LoRA / QLoRA (TRL SFTTrainer).

    python scripts/train.py --model-json results/run/model/model.json \
        --train-data results/run/data/train.jsonl --eval-data results/run/data/eval.jsonl \
        --preflight results/run/preflight.json --output-dir results/run/adapters \
        --metrics-out results/run/metrics/train.json --checkpoint-root results/run/checkpoints \
        --tensorboard-dir results/run/logs/tensorboard --quantization 4bit --epochs 3

The same script trains the CPU demo and a 7-8B model on a GPU: preflight.json says where (cuda or cpu) and
whether bf16 is available. Checkpoints go to {checkpoint-root}/{fingerprint}, the fingerprint being a hash of
every setting, input and line of training code that decides the result: a re-run after an interruption resumes from the last complete
checkpoint there, a changed setting starts fresh. SIGUSR1 or SIGTERM (Slurm, before the time limit) saves a
checkpoint and stops with exit status 2; the next run resumes. Multi-process runs (torchrun, accelerate launch)
write files from rank 0 only. The strategy (single, ddp, fsdp, deepspeed) is the one preflight.json chose for
training.strategy; under fsdp and deepspeed the engines (PyTorch FSDP, DeepSpeed ZeRO through Accelerate) shard
the model and write sharded checkpoints, and the adapter is gathered once to be saved.

The library (hpc_finetune.train): data (rows, loss masking), setup (SFTConfig, the trainer, 4-bit layers kept
trainable), fingerprint (settings, data, model, device and this program's code), control (checkpoints, progress,
signals), speed (the speed levers), convergence (the verdict on the training history; a failed one stops the
stage before the adapter is saved), run (train or resume, save the adapter whole, the metrics).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from hpc_finetune.io.cli import StageError, cli, log
from hpc_finetune.io.files import write_json
from hpc_finetune.io.schema import option
from hpc_finetune.train.adapter import adapter_snapshot, max_abs_change
from hpc_finetune.train.control import progress_callback, stop_on_signal
from hpc_finetune.train.convergence import Settings, stop_on_non_finite
from hpc_finetune.train.observe import Watch, training_settings
from hpc_finetune.train.run import (
    PATH_FIELDS,
    check_convergence,
    evaluate_last_step,
    final_metrics,
    metrics_table,
    prepare,
    run_training,
    save_adapter,
    setup_table,
)
from hpc_finetune.train.setup import build_trainer, check_trainable, sft_config


@dataclass
class Config:
    model_json: str = field(metadata={"help": "model record (model.json) of the model stage"})
    train_data: str = field(metadata={"help": "training rows (JSON Lines: messages, prompt/completion or text)"})
    eval_data: str = field(metadata={"help": "evaluation rows, same shape; may be empty (no evaluation)"})
    preflight: str = field(metadata={"help": "preflight.json: device (cuda or cpu) and bf16 support"})
    output_dir: str = field(metadata={"help": "where the adapter and tokenizer are saved"})
    metrics_out: str = field(metadata={"help": "metrics JSON to write"})
    checkpoint_root: str = field(metadata={"help": "checkpoints go to {checkpoint_root}/{fingerprint}"})
    tensorboard_dir: str = field(metadata={"help": "TensorBoard event files"})
    epochs: float = option("training.epochs")
    max_steps: int = option("training.max_steps")
    learning_rate: float = option("training.learning_rate")
    lr_scheduler: str = option("training.lr_scheduler")
    warmup_ratio: float = option("training.warmup_ratio")
    weight_decay: float = option("training.weight_decay")
    micro_batch_size: int = option("training.micro_batch_size")
    gradient_accumulation: int = option("training.gradient_accumulation")
    max_seq_length: int = option("training.max_seq_length")
    lora_r: int = option("training.lora_r")
    lora_alpha: float = option("training.lora_alpha")
    lora_dropout: float = option("training.lora_dropout")
    target_modules: str | list[str] = option("training.target_modules")
    quantization: str = option("training.quantization")
    strategy: str = option("training.strategy")
    cpu_offload: bool = option("training.cpu_offload")
    zero_stage: int = option("training.zero_stage")
    gradient_checkpointing: bool = option("training.gradient_checkpointing")
    bf16: bool | str = option("training.bf16")
    packing: bool = option("training.packing")
    assistant_only_loss: bool = option("training.assistant_only_loss")
    eval_steps: int = option("training.eval_steps")
    save_steps: int = option("training.save_steps")
    save_total_limit: int = option("training.save_total_limit")
    logging_steps: int = option("training.logging_steps")
    early_stopping_patience: int | None = option("training.early_stopping_patience")
    optim: str = option("training.optim")
    seed: int = option("training.seed")
    dataloader_num_workers: int = option("training.dataloader_num_workers")
    padding_free: bool | str = option("training.padding_free")
    attn_implementation: str = option("training.attn_implementation")
    gradient_checkpointing_mode: str = option("training.gradient_checkpointing_mode")
    gradient_checkpointing_every_n_layers: int = option("training.gradient_checkpointing_every_n_layers")
    torch_compile: bool = option("training.torch_compile")
    liger_kernels: bool = option("training.liger_kernels")
    dataloader_pin_memory: bool = option("training.dataloader_pin_memory")
    convergence: dict = option("training.convergence")
    resources_out: str = field(default="", metadata={"help": "resources.csv (GPU and process samples) to write; "
                                                              "empty: no sampling"})
    resource_interval_s: float = option("tracking.resource_interval_s")
    mlflow: bool = option("tracking.mlflow")
    mlflow_experiment: str = option("tracking.experiment")
    run_name: str = option("run_name")
    mlflow_tags: dict = field(default_factory=dict, metadata={
        "help": "JSON object of tags for the MLflow run (an experiment's run: its sweep values, README \"Experiments\")"})


def main(cfg: Config, callbacks: tuple = ()) -> dict:
    """Train; return the metrics. `callbacks`: extra TrainerCallbacks (tests use them to interrupt a run)."""
    started = time.time()
    import datasets
    import transformers

    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    checks = Settings.of(cfg.convergence)
    run = prepare(cfg, __file__)
    args = sft_config(cfg, run.dir, cpu=run.device != "cuda", bf16=run.bf16, has_eval=run.eval_ds is not None,
                      resuming=run.resume is not None, mode=run.mode, trust_remote_code=run.trust_remote_code,
                      strategy=run.strategy)
    progress = progress_callback()
    watch = Watch(cfg, run.rank, run.dir, training_settings(cfg, PATH_FIELDS))
    with stop_on_signal() as stopper:
        trainer = build_trainer(cfg, run.path, args, run.tokenizer, run.train_ds, run.eval_ds,
                                [progress, *callbacks, stopper, stop_on_non_finite(), *watch.callbacks()])
        trainable, total = check_trainable(trainer)
        if run.rank == 0:
            log.info("\n%s", setup_table(cfg, run, trainable, total))
        before = adapter_snapshot(trainer.model)
        with watch.resources(lambda: trainer.state.global_step):
            seconds, tokens = run_training(trainer, run.resume, progress)
        if stopper.received:
            raise StageError(
                f"stopped by {stopper.received} at step {trainer.state.global_step}: checkpoint saved in {run.dir}; "
                "run the workflow again to resume"
            )
        evaluate_last_step(trainer)

    change = max_abs_change(trainer.model, before)
    metrics = final_metrics(cfg, run, trainer, started=started, seconds=seconds, tokens=tokens, trainable=trainable,
                            total=total, change=change)
    metrics.update(watch.metrics())
    check_convergence(trainer, cfg, metrics, checks)  # a failed verdict stops here: no adapter is saved
    if change == 0:
        raise StageError("training finished but the adapter weights did not change: nothing was learned")
    save_adapter(trainer, cfg.output_dir)
    if trainer.is_world_process_zero():
        write_json(cfg.metrics_out, metrics)
        watch.finish(metrics)
        log.info("\n%s", metrics_table(metrics))
    return metrics


if __name__ == "__main__":
    cli(main, Config, __doc__)
