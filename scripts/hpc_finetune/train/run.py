"""Running the train stage's trainer and keeping what it made: train or resume (or take a finished run's adapter),
the closing evaluation, proof that the adapter changed, and the adapter saved whole: written into a sibling
directory and renamed into place, so that no reader ever sees half an adapter.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpc_finetune.io.cli import StageError, log, table
from hpc_finetune.io.files import read_json
from hpc_finetune.io.measure import peak_memory
from hpc_finetune.model.portable import make_portable
from hpc_finetune.train import fingerprint as fingerprints
from hpc_finetune.train.control import find_resume_checkpoint, first_last, load_checkpoint, run_finished
from hpc_finetune.train.data import loss_mode, read_data, to_dataset
from hpc_finetune.train.observe import OBSERVE_FIELDS
from hpc_finetune.train.setup import resolve_bf16

# Config fields that are where things are, not what is trained: left out of the fingerprint.
PATH_FIELDS = (
    "model_json", "train_data", "eval_data", "preflight", "output_dir", "metrics_out", "checkpoint_root",
    "tensorboard_dir",
)


@dataclass
class Run:
    """What the train stage works with, once its inputs are read: the model, the device, the data in TRL's form,
    and where this run's checkpoints are (and the one to resume from)."""

    record: dict
    path: str
    trust_remote_code: bool
    device: str
    bf16: bool
    world_size: int
    rank: int
    tokenizer: Any
    fmt: str
    mode: str
    train_ds: Any
    eval_ds: Any
    fingerprint: str
    dir: Path
    resume: Path | None


def prepare(cfg: Any, program: str | Path) -> Run:
    """Read the inputs (preflight report, model record, data), fix the device and precision, and find this run's
    checkpoint directory (named by the fingerprint) and the complete checkpoint to resume from."""
    import torch
    from transformers import AutoTokenizer

    preflight = read_json(cfg.preflight, "preflight report")
    record = read_json(cfg.model_json, "model record")
    device = preflight.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise StageError("preflight chose cuda but this process sees no GPU; run the train job on a GPU node")
    bf16 = resolve_bf16(cfg.bf16, preflight)
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    tokenizer = AutoTokenizer.from_pretrained(record["path"], trust_remote_code=record.get("trust_remote_code", False))
    train_rows, eval_rows, fmt = read_data(cfg.train_data, cfg.eval_data)
    mode = loss_mode(fmt, tokenizer, cfg.assistant_only_loss)
    settings = {k: v for k, v in asdict(cfg).items() if k not in PATH_FIELDS + OBSERVE_FIELDS}
    covered = fingerprints.parts(settings, cfg.train_data, cfg.eval_data, record, device, bf16, world_size, program)
    fp = fingerprints.fingerprint(covered)
    root = Path(cfg.checkpoint_root)
    run_dir = root / fp
    resume = find_resume_checkpoint(run_dir, rank == 0) if run_dir.is_dir() else None
    if resume:
        log.info("resuming from %s (fingerprint %s)", resume.name, fp)
    else:
        why = fingerprints.why_fresh(root, covered, fp) if root.is_dir() else None
        log.info("starting fresh: no complete checkpoint in %s%s", run_dir, f" ({why})" if why else "")
    if rank == 0:
        fingerprints.remember(run_dir, covered)
    return Run(record, record["path"], record.get("trust_remote_code", False), device, bf16, world_size, rank,
               tokenizer, fmt, mode, to_dataset(train_rows, fmt, mode), to_dataset(eval_rows, fmt, mode), fp,
               run_dir, resume)


def setup_table(cfg: Any, run: Run, trainable: int, total: int) -> str:
    effective = cfg.micro_batch_size * cfg.gradient_accumulation * run.world_size
    return table([
        ("model", f"{run.record.get('model_id', run.path)} ({run.path})"),
        ("parameters", f"{total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f}%)"),
        ("quantization", cfg.quantization),
        ("device", f"{run.device}, bf16 {run.bf16}, world size {run.world_size}"),
        ("data", f"{len(run.train_ds)} train / {len(run.eval_ds) if run.eval_ds else 0} eval rows, {run.fmt}"),
        ("loss", run.mode),
        ("effective batch", f"{effective} = micro batch {cfg.micro_batch_size} x gradient accumulation "
                            f"{cfg.gradient_accumulation} x world size {run.world_size}"),
        ("checkpoints", str(run.dir)),
    ], "Training setup")


def final_metrics(cfg: Any, run: Run, trainer, *, started: float, seconds: float, tokens: int, trainable: int,
                  total: int, change: float) -> dict:
    state = trainer.state
    history = state.log_history
    train_first, train_last = first_last(history, "loss")
    eval_first, eval_last = first_last(history, "eval_loss")
    return {
        "train_loss_first": train_first, "train_loss_last": train_last,
        "eval_loss_first": eval_first, "eval_loss_last": eval_last, "eval_loss_best": state.best_metric,
        "steps": state.global_step, "epochs": state.epoch, "tokens": state.num_input_tokens_seen,
        "wall_time_s": round(time.time() - started, 2), "train_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None, "peak_memory": peak_memory(),
        "trainable_params": trainable, "total_params": total,
        "effective_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation * run.world_size,
        "world_size": run.world_size, "quantization": cfg.quantization, "device": run.device, "bf16": run.bf16,
        "resumed_from": str(run.resume) if run.resume else None, "adapter_max_abs_change": change,
        "loss_mode": run.mode, "data_format": run.fmt, "fingerprint": run.fingerprint,
        "checkpoint_dir": str(run.dir), "log_history": history,
    }


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
