"""Evaluate stage: did the model learn? Held-out answer loss of the base and the fine-tuned model, and greedy
answers of the fine-tuned model compared with the reference answers of training and held-out rows.

    python scripts/evaluate.py --num-samples 16 --max-new-tokens 96 --merged true \
        --model-json results/demo/model/model.json --finetuned results/demo/merged \
        --train-data results/demo/data/train.jsonl --eval-data results/demo/data/eval.jsonl \
        --metrics-out results/demo/metrics/evaluate.json --samples-out results/demo/eval/samples.jsonl

--finetuned is the merged model (--merged true) or the adapter directory (--merged false: base + adapter).
Loss counts the answer tokens only (the last assistant turn, the completion, or the whole text), rendered as the
train stage rendered them (hpc_finetune.data.rows); hpc_finetune.evaluate scores and generates. Text rows have no separate answer: no generation for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_finetune.data.rows import detect_format, encode, prompt_ids, render
from hpc_finetune.evaluate.report import summary_rows
from hpc_finetune.evaluate.scoring import answer_loss, generate, sample_record
from hpc_finetune.io.cli import StageError, cli, log, table
from hpc_finetune.io.files import model_dir, read_jsonl, write_json, write_jsonl
from hpc_finetune.io.measure import peak_memory
from hpc_finetune.io.schema import option
from hpc_finetune.model.load import dtype_name, free, load_adapter, load_model, load_tokenizer, resolve_dtype


@dataclass
class Config:
    model_json: str = field(
        metadata={"help": "model record of the model stage (its 'path' is the base model)"}
    )
    finetuned: str = field(
        metadata={"help": "merged model directory, or adapter directory with --merged false"}
    )
    train_data: str = field(metadata={"help": "train.jsonl (its first rows are answered)"})
    eval_data: str = field(metadata={"help": "eval.jsonl (loss and answers; may be empty)"})
    metrics_out: str = field(metadata={"help": "metrics JSON"})
    samples_out: str = field(metadata={"help": "JSONL of every generated answer"})
    num_samples: int = option("evaluate.num_samples")
    max_new_tokens: int = option("evaluate.max_new_tokens")
    merged: bool = field(
        default=True, metadata={"help": "--finetuned is a merged model (true) or an adapter"}
    )
    max_eval_rows: int = field(
        default=500, metadata={"help": "eval rows whose loss is measured (the first ones)"}
    )
    max_length: int = field(default=2048, metadata={"help": "longest sequence scored; longer ones are cut"})
    max_batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per loss batch"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generation batch"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU), ..."})


def read_rows(path: str) -> list[dict]:
    if not Path(path).is_file():
        raise StageError(f"data file {path} is missing; run the data stage first")
    return read_jsonl(path)


def check_finetuned(path: str, merged: bool) -> None:
    """A clear message when --finetuned and --merged do not agree."""
    directory = Path(path)
    if not directory.is_dir():
        raise StageError(
            f"fine-tuned model {directory} does not exist; run the train (and merge) stage first"
        )
    if merged and not (directory / "config.json").is_file() and (directory / "adapter_config.json").is_file():
        raise StageError(f"{directory} is an adapter, not a merged model: pass --merged false")
    if (
        not merged
        and not (directory / "adapter_config.json").is_file()
        and (directory / "config.json").is_file()
    ):
        raise StageError(f"{directory} is a full model, not an adapter: pass --merged true")


def answers(model: Any, tokenizer: Any, fmt: str | None, samples: dict[str, list], cfg: Config) -> tuple[list, str | None]:
    """Greedy answers of the sampled train and eval rows; (records, why generation was skipped or None)."""
    if fmt == "text":
        return [], "text rows have no separate answer to compare a generation with"
    if fmt is None:
        return [], "no rows in the train or eval data"
    records = []
    for split, chosen in samples.items():
        if chosen:
            log.info("generating %d %s answers (greedy, up to %d tokens)", len(chosen), split, cfg.max_new_tokens)
            texts = generate(model, tokenizer, [prompt_ids(tokenizer, r, fmt) for r in chosen], cfg.max_new_tokens,
                             cfg.max_length, cfg.batch_size)
            records += [sample_record(split, i, r, a) for i, (r, a) in enumerate(zip(chosen, texts, strict=True))]
    return records, None


def metrics_of(cfg: Config, base_dir: str, dtype, fmt, base: dict, tuned: dict, samples: list, skipped: str | None,
               notes: list[str], start: float) -> dict:
    def mean_of(split: str, key: str) -> float | None:
        values = [s[key] for s in samples if s["split"] == split]
        return sum(values) / len(values) if values else None

    base_eval, tuned_eval = base["eval"], tuned["eval"]
    ratio = base_eval["loss"] / tuned_eval["loss"] if base_eval["loss"] is not None and tuned_eval["loss"] else None
    return {
        "base_model": base_dir, "finetuned": cfg.finetuned, "merged": cfg.merged, "dtype": dtype_name(dtype),
        "data_format": fmt, "base_eval_loss": base_eval["loss"], "finetuned_eval_loss": tuned_eval["loss"],
        "base_perplexity": base_eval["perplexity"], "finetuned_perplexity": tuned_eval["perplexity"],
        "eval_loss_ratio": ratio, "eval_loss_rows": base_eval["rows"], "eval_loss_tokens": base_eval["tokens"],
        "base_train_loss": base["train"]["loss"],  # on the train rows that are also answered
        "finetuned_train_loss": tuned["train"]["loss"], "train_loss_rows": base["train"]["rows"],
        "train_exact_match": mean_of("train", "exact"), "eval_exact_match": mean_of("eval", "exact"),
        "train_token_f1": mean_of("train", "f1"), "eval_token_f1": mean_of("eval", "f1"),
        "num_samples": cfg.num_samples,
        "samples_generated": {split: sum(s["split"] == split for s in samples) for split in ("train", "eval")},
        "max_new_tokens": cfg.max_new_tokens, "generation_skipped": skipped is not None,
        "generation_skipped_reason": skipped, "notes": notes, "wall_time_s": round(time.time() - start, 2),
        "peak_memory": peak_memory(),
    }


def main(cfg: Config) -> dict:
    start = time.time()
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1:
        raise StageError("num_samples and max_new_tokens must be at least 1")
    base_dir = model_dir(cfg.model_json)
    check_finetuned(cfg.finetuned, cfg.merged)
    dtype = resolve_dtype(cfg.dtype)
    tokenizer = load_tokenizer(cfg.finetuned, base_dir)
    train_rows, eval_rows = read_rows(cfg.train_data), read_rows(cfg.eval_data)
    train_fmt, eval_fmt = detect_format(train_rows, cfg.train_data), detect_format(eval_rows, cfg.eval_data)
    if train_fmt and eval_fmt and train_fmt != eval_fmt:
        raise StageError(f"{cfg.train_data} holds {train_fmt} rows but {cfg.eval_data} holds {eval_fmt} rows")
    fmt = train_fmt or eval_fmt
    # What is scored: eval rows for the loss (plus the generated train rows, to see what was memorised).
    loss_rows = eval_rows[: cfg.max_eval_rows]
    notes = [f"eval loss on the first {len(loss_rows)} of {len(eval_rows)} eval rows"] * (len(eval_rows) > len(loss_rows))
    notes += ["eval data is empty: no held-out loss and no held-out answers"] * (not eval_rows)
    eval_encoded = [encode(tokenizer, render(r, tokenizer, fmt), fmt, cfg.max_length) for r in loss_rows]
    sampled = {split: [render(r, tokenizer, fmt) for r in rows[: cfg.num_samples]]
               for split, rows in (("train", train_rows), ("eval", eval_rows))}
    train_encoded = [encode(tokenizer, r, fmt, cfg.max_length) for r in sampled["train"]]

    def losses(model: Any) -> dict:
        pad, budget = tokenizer.pad_token_id, cfg.max_batch_tokens
        return {"eval": answer_loss(model, eval_encoded, pad, budget),
                "train": answer_loss(model, train_encoded, pad, budget)}

    log.info("scoring the base model %s", base_dir)
    base = load_model(base_dir, dtype, "base model")
    if cfg.merged:
        base_scores = losses(base)
        del base
        free()
        log.info("scoring the merged model %s", cfg.finetuned)
        model = load_model(cfg.finetuned, dtype, "merged model")
    else:
        model = load_adapter(base, cfg.finetuned)
        with model.disable_adapter():
            base_scores = losses(model)
        log.info("scoring base + adapter %s", cfg.finetuned)
    tuned_scores = losses(model)
    samples, skipped = answers(model, tokenizer, fmt, sampled, cfg)
    notes += [f"generation skipped: {skipped}"] * bool(skipped)
    write_jsonl(cfg.samples_out, samples)
    metrics = metrics_of(cfg, base_dir, dtype, fmt, base_scores, tuned_scores, samples, skipped, notes, start)
    write_json(cfg.metrics_out, metrics)
    log.info("\n%s", table(summary_rows(metrics), title="evaluation summary"))
    return metrics


if __name__ == "__main__":
    cli(main, Config, __doc__)
