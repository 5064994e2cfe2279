"""The evaluate stage in two parts (scripts/evaluate.py --part): the base model's side, scored once per (base
model, test set, evaluate settings) and shared by every run of an experiment, and the fine-tuned side, which takes
the base side from the base part's files and refuses them when they were made for other rows or settings.

base.json is the base side of evaluate.json (the same keys, base values only; a leaderboard reads it like an
evaluate.json) plus what the fine-tuned part needs: `scores` (the base model's losses, per group too), `settings`
(the evaluate settings it was made with) and `digest` (sha256 of those settings and the token ids of the scored
rows, their prompts and the first train rows: another test set, another tokenisation or other settings give
another digest). The base part's samples JSONL holds the base answers, one per scored prompt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import iter_jsonl, read_json

PARTS = ("both", "base", "finetuned")
# evaluate.json keys that only the fine-tuned side has: not in base.json
FINETUNED_KEYS = ("finetuned", "merged", "finetuned_eval_loss", "finetuned_perplexity", "eval_loss_ratio",
                  "finetuned_train_loss", "eval_exact_match", "eval_token_f1")


def digest(settings: dict, encoded: list, train_encoded: list, prompts: list) -> str:
    """sha256 of the settings and the token ids the base side was scored on."""
    text = json.dumps({"settings": settings, "scored": encoded, "train": train_encoded, "prompts": prompts},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def base_record(metrics: dict, scores: dict, settings: dict, key: str) -> dict:
    """base.json: the stage's metrics for the base model alone, and what the fine-tuned part needs."""
    kept = {k: v for k, v in metrics.items() if k not in FINETUNED_KEYS}
    return {"part": "base", **kept, "scores": {k: v for k, v in scores.items() if k != "answers"},
            "settings": settings, "digest": key}


def _read_base_json(path: str) -> dict:
    if not Path(path).is_file():
        raise StageError(f"--base-metrics {path} does not exist: run the base part (scripts/evaluate.py --part base) "
                         "first")
    record = read_json(path, "--base-metrics")
    if not isinstance(record, dict) or record.get("part") != "base":
        raise StageError(f"--base-metrics {path} is not a base part's metrics (no \"part\": \"base\"); pass the "
                         "--metrics-out of scripts/evaluate.py --part base")
    return record


def read_base(metrics_path: str, samples_path: str, base_dir: str, settings: dict, key: str,
              prompts: list[str]) -> tuple[dict, dict]:
    """(base.json, the base model's scores with its answers) for the fine-tuned part. A StageError naming the
    file and what differs when they were made for another base model, other settings or other rows."""
    record = _read_base_json(metrics_path)
    if record.get("base_model") != base_dir:
        raise StageError(f"--base-metrics {metrics_path} scored the base model {record.get('base_model')}, this "
                         f"run's base model is {base_dir}: run the base part for this model")
    stored = record.get("settings", {})
    differ = [f"{name} {stored.get(name)!r} there, {value!r} here" for name, value in
              json.loads(json.dumps(settings)).items() if stored.get(name) != value]
    if differ:
        raise StageError(f"--base-metrics {metrics_path} was made with other evaluate settings: {'; '.join(differ)}."
                         " Run the base part with this run's settings")
    if record.get("digest") != key:
        raise StageError(f"--base-metrics {metrics_path} does not match this test set: the digest of its scored rows "
                         f"(token ids of the test rows, their prompts and the first train rows) is {record.get('digest')}"
                         f", this run's is {key}. The test set, the train rows or the tokenizer differ: run the base "
                         "part on this run's data")
    if not Path(samples_path).is_file():
        raise StageError(f"--base-samples {samples_path} does not exist: run the base part first")
    samples = list(iter_jsonl(samples_path))
    if len(samples) != len(prompts) or any(s.get("prompt") != p for s, p in zip(samples, prompts, strict=False)):
        first = next((n for n, (s, p) in enumerate(zip(samples, prompts, strict=False), start=1)
                      if s.get("prompt") != p), min(len(samples), len(prompts)) + 1)
        raise StageError(f"--base-samples {samples_path} does not belong to these rows: {len(samples)} samples for "
                         f"{len(prompts)} prompts, first difference at row {first}; pass the --samples-out of the "
                         f"base part that wrote {metrics_path}")
    return record, record["scores"] | {"answers": [s["base_answer"] for s in samples]}
