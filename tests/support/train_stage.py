"""What the train stage's tests share: a fast configuration of the tiny model on the CPU, and its inputs written as
the earlier stages write them."""

from __future__ import annotations

import json
from pathlib import Path

import train

STEPS, STOP_AT = 8, 3
FAST = dict(
    learning_rate=2e-2, lr_scheduler="linear", warmup_ratio=0.0, micro_batch_size=8, gradient_accumulation=1,
    max_seq_length=256, lora_dropout=0.0, gradient_checkpointing=False, optim="adamw_torch",
    logging_steps=1, eval_steps=4, save_steps=4,
)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def make_config(base: Path, out: Path, train_rows: list[dict], eval_rows: list[dict], **overrides) -> train.Config:
    """Inputs as the earlier stages write them (base model record, data, CPU preflight) and a fast config."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps({"path": str(base), "model_id": base.name}))
    (out / "preflight.json").write_text(json.dumps({"device": "cpu", "bf16": False}))
    settings = {**FAST, "max_steps": STEPS, **overrides}
    return train.Config(
        model_json=str(out / "model.json"),
        train_data=write_jsonl(out / "train.jsonl", train_rows),
        eval_data=write_jsonl(out / "eval.jsonl", eval_rows),
        preflight=str(out / "preflight.json"),
        output_dir=str(out / "adapters"),
        metrics_out=str(out / "metrics" / "train.json"),
        checkpoint_root=settings.pop("checkpoint_root", str(out / "checkpoints")),
        tensorboard_dir=str(out / "tensorboard"),
        **settings,
    )
