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
from hpc_finetune.io.files import read_json, write_json
from hpc_finetune.io.measure import peak_memory
from hpc_finetune.model.portable import make_portable
from hpc_finetune.train import convergence
from hpc_finetune.train import fingerprint as fingerprints
from hpc_finetune.train import strategy as strategies
from hpc_finetune.train.adapter import save_gathered_adapter
from hpc_finetune.train.control import (
    adapter_dtype_kept,
    find_resume_checkpoint,
    first_last,
    load_checkpoint,
    run_finished,
)
from hpc_finetune.train.data import loss_mode, read_data, to_dataset
from hpc_finetune.train.observe import OBSERVE_FIELDS
from hpc_finetune.train.resources import summary_rows as resource_rows
from hpc_finetune.train.setup import resolve_bf16

# Config fields that are where things are, not what is trained: left out of the fingerprint.
PATH_FIELDS = (
    "model_json", "train_data", "eval_data", "preflight", "output_dir", "metrics_out", "checkpoint_root",
    "tensorboard_dir",
)
# Config fields that judge the run, not what is trained: left out of the fingerprint too, so that a changed
# threshold re-checks a finished run (its checkpoint's history) instead of training it again.
CHECK_FIELDS = ("convergence",)


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
    strategy: dict  # name (single, ddp, fsdp, deepspeed), why, decoder_layer_classes, per_gpu_mb (preflight's)


def train_strategy(cfg: Any, preflight: dict, device: str, world_size: int) -> dict:
    """The strategy of this run: preflight's choice for training.strategy (it knows the GPUs' memory), checked
    against what this process sees; decided here only when the report has none (tests write a bare one)."""
    chosen = dict(preflight.get("strategy") or {})
    name = chosen.get("chosen")
    if name is None or chosen.get("requested") != cfg.strategy:
        if device == "cuda":
            name, why = (cfg.strategy if cfg.strategy != "auto" else "ddp" if world_size > 1 else "single",
                         "preflight.json has no choice for it")
        else:
            name, why = strategies.choose(cfg.strategy, world=world_size, device=device, quantization=cfg.quantization)
        chosen.update(requested=cfg.strategy, why=why)
    elif device != "cuda":  # the CPU guard again: a hand-written report must not put 4-bit weights into FSDP
        strategies.choose(name, world=world_size, device=device, quantization=cfg.quantization)
    if name in ("single", "ddp"):
        name = "ddp" if world_size > 1 else "single"  # what the launcher actually started
    if chosen.get("world_size") not in (None, world_size):
        log.warning("preflight planned for %s processes, this run has %d", chosen["world_size"], world_size)
    return chosen | {"name": name}


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
    strategy = train_strategy(cfg, preflight, device, world_size)
    # a sharded checkpoint resumes only under the strategy that wrote it: the resolved one is part of the settings
    skipped = PATH_FIELDS + CHECK_FIELDS + OBSERVE_FIELDS
    settings = {k: v for k, v in asdict(cfg).items() if k not in skipped} | {"strategy": strategy["name"]}
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
               run_dir, resume, strategy)


def setup_table(cfg: Any, run: Run, trainable: int, total: int) -> str:
    effective = cfg.micro_batch_size * cfg.gradient_accumulation * run.world_size
    return table([
        ("model", f"{run.record.get('model_id', run.path)} ({run.path})"),
        ("parameters", f"{total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f}%)"),
        ("quantization", cfg.quantization),
        ("device", f"{run.device}, bf16 {run.bf16}, world size {run.world_size}"),
        ("strategy", f"{run.strategy['name']} (training.strategy {cfg.strategy}"
                     f"{': ' + run.strategy['why'] if run.strategy.get('why') else ''})"),
        ("shards", strategies.shards(run.strategy["name"], run.world_size, cfg.zero_stage)),
        ("memory per GPU", memory_per_gpu(run)),
        ("data", f"{len(run.train_ds)} train / {len(run.eval_ds) if run.eval_ds else 0} eval rows, {run.fmt}"),
        ("loss", run.mode),
        ("effective batch", f"{effective} = micro batch {cfg.micro_batch_size} x gradient accumulation "
                            f"{cfg.gradient_accumulation} x world size {run.world_size}"),
        ("checkpoints", str(run.dir)),
    ], "Training setup")


def memory_per_gpu(run: Run) -> str:
    """The preflight estimate of this run's strategy, per GPU (an estimate; none on the CPU)."""
    row = (run.strategy.get("per_gpu_mb") or {}).get(run.strategy["name"])
    if not row:
        return "-"
    offload = run.strategy.get("cpu_offload") and "mb_per_gpu_cpu_offload" in row
    mb = row["mb_per_gpu_cpu_offload"] if offload else row["mb_per_gpu"]
    where = "planned on the GPUs" if run.device == "cuda" else "if these were GPUs"
    return f"~{mb} MiB (preflight estimate{', cpu_offload' if offload else ''}, {where})"


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
        "world_size": run.world_size, "strategy": run.strategy["name"], "quantization": cfg.quantization,
        "device": run.device, "bf16": run.bf16,
        "resumed_from": str(run.resume) if run.resume else None, "adapter_max_abs_change": change,
        "loss_mode": run.mode, "data_format": run.fmt, "fingerprint": run.fingerprint,
        "checkpoint_dir": str(run.dir), "log_history": history,
    }


def failed_metrics_path(metrics_out: str | Path) -> Path:
    """Where the metrics of a run that failed its convergence check go: next to metrics_out, not it (Snakemake
    removes a failed job's declared outputs)."""
    out = Path(metrics_out)
    return out.with_name(f"{out.stem}.failed{out.suffix}")


def check_convergence(trainer, cfg: Any, metrics: dict, settings: convergence.Settings) -> None:
    """The convergence verdict on the whole history (a resumed run's holds the earlier sessions' steps) into
    metrics["convergence"], its reasons logged. A failed verdict (with fail_stage) writes the metrics to
    failed_metrics_path, logs their table and raises StageError with the reasons: no adapter is saved."""
    total = trainer.state.max_steps
    schedule = convergence.Schedule(cfg.learning_rate, cfg.lr_scheduler, trainer.args.get_warmup_steps(total), total)
    result = metrics["convergence"] = convergence.check(trainer.state.log_history, schedule, settings,
                                                        best_kept=trainer.args.load_best_model_at_end)
    main = trainer.is_world_process_zero()
    failed = failed_metrics_path(cfg.metrics_out)
    if main:
        for status in ("failed", "warning"):
            for check in (c for c in result["checks"].values() if c["status"] == status):
                log.warning("convergence %s: %s", status, check["detail"])
    if result["verdict"] == "failed" and settings.fail_stage:
        if main:
            write_json(failed, metrics)
            log.info("\n%s", metrics_table(metrics))
        reasons = "\n  - ".join(result["reasons"])
        raise StageError(f"the convergence check failed, so no adapter was saved (the run's metrics and verdict: "
                         f"{failed}; training.convergence.fail_stage false only reports it):\n  - {reasons}")
    if main:
        failed.unlink(missing_ok=True)  # a failed earlier attempt's


def metrics_table(metrics: dict) -> str:
    """The train log's closing table: every metric but the long ones, the convergence verdict with its reasons, and
    peak / mean resource use."""
    rows = [(k, v) for k, v in metrics.items() if k not in ("log_history", "convergence", "resources")]
    if result := metrics.get("convergence"):
        rows.append(("convergence", result["verdict"] + (f" (best eval at step {result['best_step']})"
                                                         if result["best_step"] is not None else "")))
        rows += [("  reason", reason) for reason in result["reasons"]]
    return table(rows + resource_rows(metrics.get("resources", {})), "Training summary")


def run_training(trainer, resume: Path | None, progress) -> tuple[float, int]:
    """Train (or resume); return the seconds and tokens of this session."""
    if resume and run_finished(resume):
        log.info("%s is the end of the run: taking its adapter, nothing left to train", resume.name)
        load_checkpoint(trainer, resume)
        return 0.0, 0
    start = time.time()
    with adapter_dtype_kept(trainer.model):  # a resumed run trains in the dtype the run began in
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return time.time() - start, trainer.state.num_input_tokens_seen - progress.tokens0


def evaluate_last_step(trainer) -> None:
    """Evaluate the final adapter when the last evaluation came before the last step, so that the metrics show
    the eval loss before and after training."""
    evaluated = [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry]
    if convergence.broken(trainer.state.log_history):
        return  # stopped at a non-finite loss or gradient: the weights are broken, the convergence check says so
    if trainer.eval_dataset is not None and (not evaluated or evaluated[-1] < trainer.state.global_step):
        trainer.evaluate()


def save_adapter(trainer, output_dir: str) -> None:
    """Adapter (adapter_config.json, adapter_model.safetensors) and tokenizer, written into a sibling temporary
    directory and renamed into place: a reader never sees half an adapter. Under FSDP (sharded state dicts, which
    the trainer's save_model skips) the adapter is gathered once and saved by PEFT; DeepSpeed ZeRO-3 gathers it
    in save_model (stage3_gather_16bit_weights_on_model_save)."""
    out = Path(output_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    if getattr(trainer, "is_fsdp_enabled", False):
        save_gathered_adapter(trainer.model, tmp, trainer.is_world_process_zero())
        if trainer.is_world_process_zero():
            trainer.processing_class.save_pretrained(str(tmp))
    else:
        trainer.save_model(str(tmp))  # every rank takes part (sharded models); only rank 0 writes
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        make_portable(tmp)  # vLLM on transformers 4 loads an adapter's tokenizer too
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)  # left by a save killed between the two renames
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
