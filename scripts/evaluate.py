"""Evaluate stage: did the model learn? Held-out answer loss of the base and the fine-tuned model, and greedy
answers of the fine-tuned model compared with the reference answers of training and held-out rows.

    python scripts/evaluate.py --num-samples 16 --max-new-tokens 96 --merged true \
        --model-json results/demo/model/model.json --finetuned results/demo/merged \
        --train-data results/demo/data/train.jsonl --eval-data results/demo/data/eval.jsonl \
        --metrics-out results/demo/metrics/evaluate.json --samples-out results/demo/eval/samples.jsonl

--finetuned is the merged model (--merged true) or the adapter directory (--merged false: base + adapter).
Loss counts the answer tokens only (the last assistant turn, the completion, or the whole text), rendered as the
train stage rendered them (scripts/rows.py). Text rows have no separate answer: no generation for them.
"""

from __future__ import annotations

import logging
import math
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import StageError, cli, model_dir, peak_memory, read_jsonl, table, write_json, write_jsonl
from merge import dtype_name, free, input_device, load_adapter, load_model, load_tokenizer, resolve_dtype
from rows import Rendered, detect_format, encode, prompt_ids, render

log = logging.getLogger("finetune.evaluate")


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
    num_samples: int = field(default=32, metadata={"help": "rows answered from each of train and eval"})
    max_new_tokens: int = field(default=128, metadata={"help": "generation budget per answer"})
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


# --- scoring ---------------------------------------------------------------------------------------------------

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation: the tokens of the token-level F1 (as in SQuAD)."""
    return _PUNCT.sub(" ", text.lower()).split()


def token_f1(generated: str, reference: str) -> float:
    pred, ref = words(generated), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# --- model passes ----------------------------------------------------------------------------------------------


def answer_loss(model: Any, encoded: list[tuple[list[int], int]], pad_id: int, max_batch_tokens: int) -> dict:
    """Mean negative log-likelihood per answer token over all rows (token-weighted), batched by padded size."""
    import torch
    import torch.nn.functional as F

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    batches, current = [], []
    for i in order:
        longest = len(encoded[current[0]][0]) if current else len(encoded[i][0])
        if current and longest * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)

    device = input_device(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens, prompt_len = encoded[i]
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
                start = max(prompt_len, 1)  # the first token is never predicted
                labels[row, start : len(tokens)] = torch.tensor(tokens[start:], dtype=torch.long)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            target = labels[:, 1:].to(logits.device)
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += int((target != -100).sum())
            del logits
    mean = total / count if count else None
    return {
        "loss": mean,
        "perplexity": math.exp(mean) if mean is not None and mean < 700 else None,
        "tokens": count,
        "rows": len(encoded),
    }


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends an answer: the generation config's EOS tokens and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return sorted(set(ids))


def generate(model: Any, tokenizer: Any, prompts: list[list[int]], cfg: Config) -> list[str]:
    """Greedy answers (deterministic), batched with left padding."""
    import torch
    from transformers import GenerationConfig

    gen_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    keep = max(cfg.max_length - cfg.max_new_tokens, 1)
    device = input_device(model)
    answers = []
    with torch.inference_mode():
        for start in range(0, len(prompts), cfg.batch_size):
            batch = [p[-keep:] for p in prompts[start : start + cfg.batch_size]]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, tokens in enumerate(batch):
                ids[row, width - len(tokens) :] = torch.tensor(tokens)
                mask[row, width - len(tokens) :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_config
            )
            for row in out[:, width:].tolist():
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


# --- the stage -------------------------------------------------------------------------------------------------


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
    notes = []

    # What is scored: eval rows for the loss (plus the generated train rows, to see what was memorised).
    loss_rows = eval_rows[: cfg.max_eval_rows]
    if len(eval_rows) > len(loss_rows):
        notes.append(f"eval loss on the first {len(loss_rows)} of {len(eval_rows)} eval rows")
    if not eval_rows:
        notes.append("eval data is empty: no held-out loss and no held-out answers")
    eval_encoded = [encode(tokenizer, render(r, tokenizer, fmt), fmt, cfg.max_length) for r in loss_rows]
    train_sample = [render(r, tokenizer, fmt) for r in train_rows[: cfg.num_samples]]
    eval_sample = [render(r, tokenizer, fmt) for r in eval_rows[: cfg.num_samples]]
    train_encoded = [encode(tokenizer, r, fmt, cfg.max_length) for r in train_sample]

    def losses(model: Any) -> dict:
        pad, budget = tokenizer.pad_token_id, cfg.max_batch_tokens
        return {
            "eval": answer_loss(model, eval_encoded, pad, budget),
            "train": answer_loss(model, train_encoded, pad, budget),
        }

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

    samples: list[dict] = []
    skipped_reason = None
    if fmt == "text":
        skipped_reason = "text rows have no separate answer to compare a generation with"
    elif fmt is None:
        skipped_reason = "no rows in the train or eval data"
    else:
        for split, chosen in (("train", train_sample), ("eval", eval_sample)):
            if not chosen:
                continue
            log.info(
                "generating %d %s answers (greedy, up to %d tokens)", len(chosen), split, cfg.max_new_tokens
            )
            answers = generate(model, tokenizer, [prompt_ids(tokenizer, r, fmt) for r in chosen], cfg)
            samples += [
                sample_record(split, i, r, a) for i, (r, a) in enumerate(zip(chosen, answers, strict=True))
            ]
    if skipped_reason:
        notes.append(f"generation skipped: {skipped_reason}")
    write_jsonl(cfg.samples_out, samples)

    def mean_of(split: str, key: str) -> float | None:
        values = [s[key] for s in samples if s["split"] == split]
        return sum(values) / len(values) if values else None

    base_eval, tuned_eval = base_scores["eval"], tuned_scores["eval"]
    ratio = None
    if base_eval["loss"] is not None and tuned_eval["loss"]:
        ratio = base_eval["loss"] / tuned_eval["loss"]
    metrics = {
        "base_model": base_dir,
        "finetuned": cfg.finetuned,
        "merged": cfg.merged,
        "dtype": dtype_name(dtype),
        "data_format": fmt,
        "base_eval_loss": base_eval["loss"],
        "finetuned_eval_loss": tuned_eval["loss"],
        "base_perplexity": base_eval["perplexity"],
        "finetuned_perplexity": tuned_eval["perplexity"],
        "eval_loss_ratio": ratio,
        "eval_loss_rows": base_eval["rows"],
        "eval_loss_tokens": base_eval["tokens"],
        "base_train_loss": base_scores["train"]["loss"],  # on the train rows that are also answered
        "finetuned_train_loss": tuned_scores["train"]["loss"],
        "train_loss_rows": base_scores["train"]["rows"],
        "train_exact_match": mean_of("train", "exact"),
        "eval_exact_match": mean_of("eval", "exact"),
        "train_token_f1": mean_of("train", "f1"),
        "eval_token_f1": mean_of("eval", "f1"),
        "num_samples": cfg.num_samples,
        "samples_generated": {
            "train": sum(s["split"] == "train" for s in samples),
            "eval": sum(s["split"] == "eval" for s in samples),
        },
        "max_new_tokens": cfg.max_new_tokens,
        "generation_skipped": skipped_reason is not None,
        "generation_skipped_reason": skipped_reason,
        "notes": notes,
        "wall_time_s": round(time.time() - start, 2),
        "peak_memory": peak_memory(),
    }
    write_json(cfg.metrics_out, metrics)
    log.info("\n%s", table(summary_rows(metrics), title="evaluation summary"))
    return metrics


def sample_record(split: str, index: int, rendered: Rendered, generated: str) -> dict:
    reference = rendered.reference or ""
    return {
        "split": split,
        "index": index,
        "prompt": rendered.prompt,
        "reference": reference,
        "generated": generated,
        "exact": float(generated.strip() == reference.strip()),
        "f1": round(token_f1(generated, reference), 4),
    }


def summary_rows(m: dict) -> list[tuple[str, Any]]:
    def fmt(value: Any, digits: int = 4) -> str:
        return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)

    rows = [
        ("eval loss base -> tuned", f"{fmt(m['base_eval_loss'])} -> {fmt(m['finetuned_eval_loss'])}"),
        ("perplexity base -> tuned", f"{fmt(m['base_perplexity'])} -> {fmt(m['finetuned_perplexity'])}"),
        ("loss ratio (base/tuned)", fmt(m["eval_loss_ratio"])),
        ("train loss base -> tuned", f"{fmt(m['base_train_loss'])} -> {fmt(m['finetuned_train_loss'])}"),
        ("exact match train / eval", f"{fmt(m['train_exact_match'])} / {fmt(m['eval_exact_match'])}"),
        ("token F1 train / eval", f"{fmt(m['train_token_f1'])} / {fmt(m['eval_token_f1'])}"),
        ("samples train / eval", f"{m['samples_generated']['train']} / {m['samples_generated']['eval']}"),
        ("wall time", f"{m['wall_time_s']} s"),
        ("peak memory", m["peak_memory"]),
    ]
    rows += [("note", note) for note in m["notes"]]
    return rows


if __name__ == "__main__":
    cli(main, Config, __doc__)
