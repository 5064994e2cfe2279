r"""Train stage: supervised fine-tuning of the base model with LoRA / QLoRA (TRL SFTTrainer).

    python scripts/train.py --model-json results/run/model/model.json \
        --train-data results/run/data/train.jsonl --eval-data results/run/data/eval.jsonl \
        --preflight results/run/preflight.json --output-dir results/run/adapters \
        --metrics-out results/run/metrics/train.json --checkpoint-root results/run/checkpoints \
        --tensorboard-dir results/run/logs/tensorboard --quantization 4bit --epochs 3

The same script trains the CPU demo and a 7-8B model on a GPU: preflight.json says where (cuda or cpu) and
whether bf16 is available. Checkpoints go to {checkpoint-root}/{fingerprint}, the fingerprint being a hash of
every setting and input that decides the result: a re-run after an interruption resumes from the last complete
checkpoint there, a changed setting starts fresh. SIGUSR1 or SIGTERM (Slurm, before the time limit) saves a
checkpoint and stops with exit status 2; the next run resumes. Multi-process runs (torchrun, accelerate launch)
write files from rank 0 only. scripts/train_control.py holds the checkpoint, progress and signal handling,
scripts/train_speed.py the speed levers.

Loss masking: chat data trains on the assistant turns when the chat template marks them with
{% generation %}; otherwise each conversation becomes prompt (all turns before the last assistant reply) and
completion (that reply), so that only the reply is trained with any template. prompt/completion data trains on
the completion, text data on everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import StageError, cli, log, peak_memory, read_json, read_jsonl, sha256_file, table, write_json
from portable import make_portable
from quantized import keep_trainable, packed_layout_guard, quantization_config
from train_control import (
    find_resume_checkpoint,
    first_last,
    load_checkpoint,
    progress_callback,
    run_finished,
    stop_on_signal,
)
from train_speed import attention_implementation, speed_settings

# Part of the checkpoint fingerprint: bump it when a change to the stage alters what training computes, so that
# runs saved by the old code are not resumed (or taken as finished) by the new one. 2: 4-bit layers kept trainable
# on AVX512-BF16 CPUs (quantized.keep_trainable); checkpoints of version 1 trained without the frozen base's grad.
TRAINING_VERSION = 2

PATH_FIELDS = (
    "model_json", "train_data", "eval_data", "preflight", "output_dir", "metrics_out", "checkpoint_root",
    "tensorboard_dir",
)


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
    epochs: float = field(default=3, metadata={"help": "training epochs (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps; -1: use epochs"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "linear, cosine, constant, constant_with_warmup"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of the steps spent warming up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per device per forward pass"})
    gradient_accumulation: int = field(default=4, metadata={"help": "micro-batches per optimizer step"})
    max_seq_length: int = field(default=2048, metadata={"help": "longest sequence in tokens"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: str | list[str] = field(
        default="all-linear", metadata={"help": "all-linear or a JSON list of module names"}
    )
    quantization: str = field(default="4bit", metadata={"help": "4bit (QLoRA, nf4 + double quant), 8bit, none"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward"})
    bf16: bool | str = field(default="auto", metadata={"help": "true, false, or auto (what preflight found)"})
    packing: bool = field(default=False, metadata={"help": "pack several short rows into one sequence"})
    assistant_only_loss: bool = field(default=True, metadata={"help": "chat data: loss on assistant replies only"})
    eval_steps: int = field(default=50, metadata={"help": "evaluate every this many steps"})
    save_steps: int = field(default=50, metadata={"help": "save a checkpoint every this many steps"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints to keep"})
    logging_steps: int = field(default=10, metadata={"help": "log progress every this many steps"})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "evaluations without eval-loss improvement before stopping; null: off"}
    )
    optim: str = field(default="paged_adamw_8bit", metadata={"help": "optimizer name as transformers knows it"})
    seed: int = field(default=42, metadata={"help": "seed of the training run"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "dataloader worker processes"})
    # speed levers (README "Performance"; scripts/bench.py measures them)
    padding_free: bool | str = field(
        default="auto", metadata={"help": "micro-batches without pad tokens (rows concatenated, positions restarted): "
                                          "true, false, or auto (with flash attention only)"}
    )
    attn_implementation: str = field(
        default="auto", metadata={"help": "auto (flash_attention_2 when installed on a GPU, else sdpa), sdpa, "
                                          "flash_attention_2, flash_attention_3, eager"}
    )
    gradient_checkpointing_mode: str = field(
        default="non_reentrant", metadata={"help": "non_reentrant, reentrant, or offload (activations to host)"}
    )
    gradient_checkpointing_every_n_layers: int = field(
        default=1, metadata={"help": "checkpoint every n-th decoder layer (1: all; more: faster, more memory)"}
    )
    torch_compile: bool = field(default=False, metadata={"help": "compile the model with torch.compile"})
    liger_kernels: bool = field(
        default=False, metadata={"help": "Liger fused kernels (RMSNorm, RoPE, SwiGLU); needs liger-kernel + a GPU"}
    )
    dataloader_pin_memory: bool = field(default=True, metadata={"help": "page-locked batches for faster copies"})


# --- inputs ---------------------------------------------------------------------------------------------------


def data_format(rows: list[dict], path: str) -> str:
    """messages, prompt_completion or text; every row of a file must have the same shape."""
    shapes = {"messages": {"messages"}, "prompt_completion": {"prompt", "completion"}, "text": {"text"}}
    for lineno, row in enumerate(rows, start=1):
        found = [name for name, keys in shapes.items() if set(row) == keys]
        if not found:
            raise StageError(f"{path} row {lineno}: keys {sorted(row)} are none of {list(shapes.values())}")
        if lineno == 1:
            fmt = found[0]
        elif found[0] != fmt:
            raise StageError(f"{path} row {lineno} is {found[0]} but the first row is {fmt}; mixed formats")
    return fmt


def to_prompt_completion(messages: list[dict]) -> dict:
    """A conversation as TRL's conversational prompt/completion: the last assistant reply is the completion."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise StageError(f"a conversation has no assistant turn to train on: {json.dumps(messages)[:200]}")
    return {"prompt": messages[:last], "completion": [messages[last]]}


def loss_mode(fmt: str, tokenizer, assistant_only: bool) -> str:
    from trl.chat_template_utils import has_generation_markers

    if fmt == "text":
        return "full"
    if fmt == "prompt_completion":
        return "completion_only"
    if not tokenizer.chat_template:
        raise StageError("the data is chat messages but the tokenizer has no chat template; add one to the model")
    if not assistant_only:
        return "full"
    if has_generation_markers(tokenizer.chat_template):
        log.info("loss: assistant turns only (the chat template marks them with {% generation %})")
        return "assistant_only"
    log.info(
        "loss: the chat template has no {% generation %} markers, so each conversation trains as prompt/completion:"
        " loss on the last assistant reply only, earlier turns are context"
    )
    return "completion_only"


def to_dataset(rows: list[dict], fmt: str, mode: str):
    """The rows as a datasets.Dataset in the form the loss mode needs; None when there are none."""
    from datasets import Dataset

    if not rows:
        return None
    if fmt == "messages" and mode == "completion_only":
        rows = [to_prompt_completion(row["messages"]) for row in rows]
    return Dataset.from_list(rows)


def read_data(cfg: Config) -> tuple[list[dict], list[dict], str]:
    """Train and eval rows and their format (the same for both)."""
    train_rows, eval_rows = read_jsonl(cfg.train_data), read_jsonl(cfg.eval_data)
    if not train_rows:
        raise StageError(f"{cfg.train_data} has no rows; check the data stage's report")
    fmt = data_format(train_rows, cfg.train_data)
    if eval_rows and data_format(eval_rows, cfg.eval_data) != fmt:
        raise StageError(f"{cfg.eval_data} is {data_format(eval_rows, cfg.eval_data)} but the training data is {fmt}")
    return train_rows, eval_rows, fmt


def resolve_bf16(value: bool | str, preflight: dict) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() == "auto":
        return bool(preflight.get("bf16", False))
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise StageError(f"training.bf16 must be true, false or auto, got {value!r}")


def fingerprint(cfg: Config, model_record: dict, device: str, bf16: bool, world_size: int) -> str:
    """Short hash of everything that decides the training result: settings, data, base model, device."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in PATH_FIELDS}
    payload = {
        "version": TRAINING_VERSION,
        "training": settings,
        "train_sha256": sha256_file(cfg.train_data),
        "eval_sha256": sha256_file(cfg.eval_data),
        "model": model_record,
        "device": device,
        "bf16": bf16,
        "world_size": world_size,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- model and trainer ----------------------------------------------------------------------------------------


def sft_config(cfg: Config, run_dir: Path, *, cpu: bool, bf16: bool, has_eval: bool, resuming: bool, mode: str,
               trust_remote_code: bool):
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
            "device_map": "cpu" if cpu else {"": int(os.environ.get("LOCAL_RANK", 0))},
            "trust_remote_code": trust_remote_code,
            "attn_implementation": attention,
        },
    )
    return SFTConfig(**{**settings, **speed})


def build_trainer(cfg: Config, model_path: str, args, tokenizer, train_ds, eval_ds, callbacks: list):
    """TRL loads and quantises the model, wraps it with the adapter once, freezes the base, enables input
    gradients for checkpointing and keeps the adapter in bf16 on quantised models. No separate
    prepare_model_for_kbit_training: TRL dropped it, it would upcast embeddings and norms to fp32."""
    from unittest import mock

    from peft import LoraConfig
    from transformers import EarlyStoppingCallback, PrinterCallback
    from trl import SFTTrainer

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
        trainer = SFTTrainer(
            model=model_path,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            quantization_config=quantization_config(cfg.quantization, args.model_init_kwargs["dtype"]),
            callbacks=callbacks,
        )
    trainer.remove_callback(PrinterCallback)  # the Progress callback writes the log lines instead
    # Before any forward pass: evaluations must not repack 4-bit weights into the CPU layout without a backward.
    if layers := keep_trainable(trainer.model):
        log.info("%d 4-bit layers kept in the trainable layout (no CPU inference repack on evaluation)", layers)
        trainer.add_callback(packed_layout_guard())
    return trainer


def count_parameters(trainer) -> tuple[int, int]:
    """(trainable, total); 0 trainable is the silent failure of a frozen adapter: stop before training."""
    trainable, total = trainer.model.get_nb_trainable_parameters()
    if trainable == 0:
        raise StageError(
            "the model has 0 trainable parameters: the LoRA adapter was not attached or was frozen, so training "
            "would run and learn nothing. Check target_modules against the model's module names."
        )
    return trainable, total


def run_training(trainer, resume: Path | None, progress) -> tuple[float, int]:
    """Train (or resume); return the seconds and tokens of this session."""
    if resume and run_finished(resume):
        log.info("%s is the end of the run: taking its adapter, nothing left to train", resume.name)
        load_checkpoint(trainer, resume)
        return 0.0, 0
    start = time.time()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return time.time() - start, trainer.state.num_input_tokens_seen - progress.tokens0


def evaluate_last_step(trainer) -> None:
    """Evaluate the final adapter when the last evaluation came before the last step, so that the metrics show
    the eval loss before and after training."""
    evaluated = [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry]
    if trainer.eval_dataset is not None and (not evaluated or evaluated[-1] < trainer.state.global_step):
        trainer.evaluate()


def adapter_snapshot(model) -> dict:
    return {name: p.detach().float().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def max_abs_change(model, before: dict) -> float:
    after = dict(model.named_parameters())
    return max((after[name].detach().float().cpu() - value).abs().max().item() for name, value in before.items())


# --- outputs --------------------------------------------------------------------------------------------------


def save_adapter(trainer, output_dir: str) -> None:
    """Adapter (adapter_config.json, adapter_model.safetensors) and tokenizer, written into a sibling temporary
    directory and renamed into place: a reader never sees half an adapter."""
    out = Path(output_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))  # every rank takes part (sharded models); only rank 0 writes
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        make_portable(tmp)  # vLLM on transformers 4 loads an adapter's tokenizer too
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)


# --- main -----------------------------------------------------------------------------------------------------


def main(cfg: Config, callbacks: tuple = ()) -> dict:
    """Train; return the metrics. `callbacks`: extra TrainerCallbacks (tests use them to interrupt a run)."""
    started = time.time()
    import datasets
    import torch
    import transformers
    from transformers import AutoTokenizer

    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()

    preflight = read_json(cfg.preflight, "preflight report")
    record = read_json(cfg.model_json, "model record")
    path, trust_remote_code = record["path"], record.get("trust_remote_code", False)
    device = preflight.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise StageError("preflight chose cuda but this process sees no GPU; run the train job on a GPU node")
    bf16 = resolve_bf16(cfg.bf16, preflight)
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    train_rows, eval_rows, fmt = read_data(cfg)
    mode = loss_mode(fmt, tokenizer, cfg.assistant_only_loss)
    train_ds, eval_ds = to_dataset(train_rows, fmt, mode), to_dataset(eval_rows, fmt, mode)

    fp = fingerprint(cfg, record, device, bf16, world_size)
    run_dir = Path(cfg.checkpoint_root) / fp
    resume = find_resume_checkpoint(run_dir, rank == 0) if run_dir.is_dir() else None
    if resume:
        log.info("resuming from %s (fingerprint %s)", resume.name, fp)
    else:
        log.info("starting fresh: no complete checkpoint in %s", run_dir)
    args = sft_config(cfg, run_dir, cpu=device != "cuda", bf16=bf16, has_eval=eval_ds is not None,
                      resuming=resume is not None, mode=mode, trust_remote_code=trust_remote_code)

    progress = progress_callback()
    with stop_on_signal() as stopper:
        trainer = build_trainer(cfg, path, args, tokenizer, train_ds, eval_ds, [progress, *callbacks, stopper])
        trainable, total = count_parameters(trainer)
        effective_batch = cfg.micro_batch_size * cfg.gradient_accumulation * world_size
        if rank == 0:
            log.info("\n%s", table([
                ("model", f"{record.get('model_id', path)} ({path})"),
                ("parameters", f"{total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f}%)"),
                ("quantization", cfg.quantization),
                ("device", f"{device}, bf16 {bf16}, world size {world_size}"),
                ("data", f"{len(train_ds)} train / {len(eval_ds) if eval_ds else 0} eval rows, {fmt}"),
                ("loss", mode),
                ("effective batch", f"{effective_batch} = micro batch {cfg.micro_batch_size} x gradient "
                                    f"accumulation {cfg.gradient_accumulation} x world size {world_size}"),
                ("checkpoints", str(run_dir)),
            ], "Training setup"))

        before = adapter_snapshot(trainer.model)
        train_seconds, session_tokens = run_training(trainer, resume, progress)
        if stopper.received:
            raise StageError(
                f"stopped by {stopper.received} at step {trainer.state.global_step}: checkpoint saved in {run_dir}; "
                "run the workflow again to resume"
            )
        evaluate_last_step(trainer)

    change = max_abs_change(trainer.model, before)
    if change == 0:
        raise StageError("training finished but the adapter weights did not change: nothing was learned")
    save_adapter(trainer, cfg.output_dir)

    state = trainer.state
    history = state.log_history
    train_loss_first, train_loss_last = first_last(history, "loss")
    eval_loss_first, eval_loss_last = first_last(history, "eval_loss")
    metrics = {
        "train_loss_first": train_loss_first,
        "train_loss_last": train_loss_last,
        "eval_loss_first": eval_loss_first,
        "eval_loss_last": eval_loss_last,
        "eval_loss_best": state.best_metric,
        "steps": state.global_step,
        "epochs": state.epoch,
        "tokens": state.num_input_tokens_seen,
        "wall_time_s": round(time.time() - started, 2),
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(session_tokens / train_seconds, 1) if train_seconds else None,
        "peak_memory": peak_memory(),
        "trainable_params": trainable,
        "total_params": total,
        "effective_batch_size": effective_batch,
        "world_size": world_size,
        "quantization": cfg.quantization,
        "device": device,
        "bf16": bf16,
        "resumed_from": str(resume) if resume else None,
        "adapter_max_abs_change": change,
        "loss_mode": mode,
        "data_format": fmt,
        "fingerprint": fp,
        "checkpoint_dir": str(run_dir),
        "log_history": history,
    }
    if trainer.is_world_process_zero():
        write_json(cfg.metrics_out, metrics)
        log.info("\n%s", table([(k, v) for k, v in metrics.items() if k != "log_history"], "Training summary"))
    return metrics


if __name__ == "__main__":
    cli(main, Config, __doc__)
