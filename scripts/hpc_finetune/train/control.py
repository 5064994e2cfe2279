"""Control of a training run, for the train stage: which checkpoint to resume from (complete ones only; broken
ones set aside), loading a finished run's adapter and resuming in the adapter's own dtype, one progress line per logging step, and the stop on SIGUSR1 or
SIGTERM that Slurm sends before the time limit. No heavy imports at module level.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from hpc_finetune.io.cli import log
from hpc_finetune.train.adapter import save_gathered_adapter

# --- checkpoints ----------------------------------------------------------------------------------------------


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint directory cannot be resumed from, or None when it is complete. The trainer writes
    trainer_state.json last, so a directory without it was cut off while saving."""
    from safetensors import safe_open

    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"trainer_state.json unreadable ({err.__class__.__name__})"
    if "global_step" not in state:
        return "trainer_state.json has no global_step"
    sharded = sorted(p.name for p in path.glob("optimizer_*") if p.is_dir())  # FSDP: one directory of shards
    if (path / "latest").is_file():  # DeepSpeed: its own checkpoint under the tag `latest` names
        tag = (path / "latest").read_text().strip()
        if not tag or not (path / tag).is_dir() or not any((path / tag).iterdir()):
            return f"DeepSpeed checkpoint {tag or '(no tag)'} named by `latest` is missing or empty"
        sharded = [tag]
    for name in ("scheduler.pt",) if sharded else ("optimizer.pt", "scheduler.pt"):
        if not (path / name).is_file() or (path / name).stat().st_size == 0:
            return f"{name} missing or empty"
    fsdp = [p.name for p in path.glob("pytorch_model_fsdp_*") if p.is_dir()]
    for name in [*(s for s in sharded if s.startswith("optimizer_")), *fsdp]:
        if not (path / name / ".metadata").is_file():  # torch.distributed.checkpoint writes it after the shards
            return f"{name} is cut off (no .metadata: not every shard was written)"
    for state in sorted([*path.glob("*.pt"), *path.glob("*.pth")]):
        if not zipfile.is_zipfile(state):  # torch.save writes a zip archive; its directory is at the very end
            return f"{state.name} is cut off (not a complete torch archive)"
    try:
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as weights:
            if not list(weights.keys()):
                return "adapter_model.safetensors holds no tensors"
    except Exception as err:  # noqa: BLE001 - any failure to read the weights makes the checkpoint unusable
        return f"adapter_model.safetensors unreadable ({err.__class__.__name__})"
    return None


def find_resume_checkpoint(run_dir: Path, is_main: bool) -> Path | None:
    """The newest complete checkpoint-N in run_dir. Broken ones are set aside (renamed broken-checkpoint-N, so
    that the trainer's checkpoint rotation does not see them) with a warning."""
    candidates = sorted(
        (p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is incomplete (%s): skipping it", path, problem)
        if is_main:
            path.rename(path.with_name("broken-" + path.name))
    return None


def run_finished(checkpoint: Path) -> bool:
    """Whether the checkpoint is the last step of its run (resuming from it would train one step too many)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"] >= state.get("max_steps", float("inf"))


def load_checkpoint(trainer, checkpoint: Path) -> None:
    """The adapter weights and trainer state of a finished run's checkpoint (its best one with early stopping),
    loaded the way the trainer loads a checkpoint it resumes from."""
    from transformers import TrainerState

    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    best = trainer.state.best_model_checkpoint
    source = Path(best) if trainer.args.load_best_model_at_end and best and Path(best).is_dir() else checkpoint
    with adapter_dtype_kept(trainer.model):
        trainer.model.load_adapter(str(source), trainer.model.active_adapter, is_trainable=True)


@contextlib.contextmanager
def adapter_dtype_kept(model):
    """While it lasts, loading an adapter into `model` keeps the adapter's dtype. The trainer resumes a PEFT model
    (and loads its best checkpoint) with load_adapter, whose default autocast_adapter_dtype=True casts a bf16
    adapter to float32: a resumed QLoRA run (TRL keeps its adapter in bf16) went on in float32, so it computed
    other weights than the run it continues, and saved a float32 adapter. Checkpoints hold the adapter in the
    dtype it trains in, so the load is exact."""
    import functools

    load = getattr(model, "load_adapter", None)
    if load is None:
        yield
        return
    model.load_adapter = functools.partial(load, autocast_adapter_dtype=False)
    try:
        yield
    finally:
        del model.load_adapter  # the class's method again


def adapter_into_checkpoints():
    """A TrainerCallback for sharded runs (FSDP): the trainer's checkpoints hold each rank's shards, not an adapter;
    this gathers the LoRA weights (only those) into each checkpoint as adapter_model.safetensors, so that every
    checkpoint is loadable by PEFT, checked like any other, and a finished run's adapter can be taken from it."""
    from transformers import TrainerCallback

    class AdapterIntoCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            save_gathered_adapter(model, Path(args.output_dir) / f"checkpoint-{state.global_step}",
                                  state.is_world_process_zero)

    return AdapterIntoCheckpoints()


# --- progress and signals -------------------------------------------------------------------------------


def progress_callback():
    """One log line per logging step, on rank 0: step/total, epoch, loss, eval loss, lr, tokens/s, elapsed, ETA."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        eval_loss = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.step0, self.tokens0 = time.time(), state.global_step, state.num_input_tokens_seen
            self.eval_loss = first_last(state.log_history, "eval_loss")[1]  # a resumed run's last one

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            total = state.max_steps
            if "eval_loss" in logs:
                self.eval_loss = logs["eval_loss"]
                log.info("eval step %d/%d | eval_loss %.4f", state.global_step, total, self.eval_loss)
            if "loss" not in logs:
                return
            elapsed = time.time() - self.start
            done = state.global_step - self.step0
            eta = elapsed / done * (total - state.global_step) if done else 0
            tokens = (state.num_input_tokens_seen - self.tokens0) / elapsed if elapsed else 0
            log.info(
                "step %d/%d (%d%%) | epoch %.2f | loss %.4f | eval_loss %s | lr %.2e | %s tok/s | elapsed %s | eta %s",
                state.global_step, total, 100 * state.global_step // max(total, 1), state.epoch or 0, logs["loss"],
                "-" if self.eval_loss is None else f"{self.eval_loss:.4f}", logs.get("learning_rate", 0),
                f"{tokens:,.0f}", timedelta(seconds=round(elapsed)), timedelta(seconds=round(eta)),
            )

    return Progress()


@contextlib.contextmanager
def stop_on_signal():
    """Yield a callback that, after SIGUSR1 or SIGTERM, saves a checkpoint at the end of the current step and
    stops training (Slurm sends one before the time limit: `#SBATCH --signal=USR1@300`)."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        received: str | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.received:
                control.should_save = control.should_training_stop = True

    callback = StopOnSignal()

    def handler(signum, frame):
        callback.received = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step and stopping", callback.received)

    signums = (signal.SIGUSR1, signal.SIGTERM)
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield callback
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def first_last(history: list[dict], key: str) -> tuple[Any, Any]:
    values = [entry[key] for entry in history if key in entry]
    return (values[0], values[-1]) if values else (None, None)
