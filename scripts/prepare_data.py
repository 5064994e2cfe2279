"""Data stage: read a dataset (local file, save_to_disk directory, dataset repository or hub name), normalise every
row to a shape TRL's SFTTrainer takes, validate it, shuffle, split train/eval and report what was kept and why.

    python scripts/prepare_data.py --path data/demo/medical_qa.jsonl --format auto --text-field text \
        --split train --eval-split auto --config-name null --max-samples null --max-eval-samples null \
        --eval-fraction 0.1 --long-rows drop --max-dropped-fraction 0.5 --seed 42 --max-seq-length 256 \
        --model-json results/demo/model/model.json --train-out results/demo/data/train.jsonl \
        --eval-out results/demo/data/eval.jsonl --report-out results/demo/data/report.json

Every output row is exactly one of {"messages": [{"role", "content"}, ...]}, {"prompt", "completion"} or
{"text"} (scripts/dataset_source.py reads and normalises). A lone pre-templated `prompt` column (the seed guide's
format) becomes {"text"} without a leading BOS token (TRL adds one, and treats any column named `prompt` as
prompt/completion data). The held-out rows are the dataset's own validation/eval/test split when it has one
(dataset.eval_split), else dataset.eval_fraction of the rows; held-out rows that repeat a training row are
dropped. Outputs are written only after validation passes: a failure keeps the old ones.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field

from common import StageError, cli, log, model_dir, table, write_json, write_jsonl
from dataset_source import FORMATS, columns, is_empty, normalise, read_source, resolve_format

LONG_ROWS = ("drop", "truncate", "error")
DROP_REASONS = ("empty", "duplicate", "too_long")


@dataclass
class Config:
    path: str = field(
        metadata={"help": "json/jsonl/csv/parquet/arrow file, save_to_disk dir, dataset repository dir or hub org/name"}
    )
    model_json: str = field(metadata={"help": "model record (model.json); its tokenizer measures the rows"})
    train_out: str = field(metadata={"help": "normalised training rows (JSONL)"})
    eval_out: str = field(metadata={"help": "normalised evaluation rows (JSONL)"})
    report_out: str = field(metadata={"help": "counts and token length statistics (JSON)"})
    format: str = field(default="auto", metadata={"help": " | ".join(FORMATS)})
    text_field: str = field(default="text", metadata={"help": "column with the training text (format text)"})
    split: str = field(default="train", metadata={"help": "split to train on (datasets with splits)"})
    eval_split: str = field(
        default="auto", metadata={"help": "held-out split: auto (validation/valid/eval/dev/test when present), none, "
                                          "or a split name"}
    )
    config_name: str | None = field(default=None, metadata={"help": "configuration of a hub dataset"})
    max_samples: int | None = field(default=None, metadata={"help": "keep at most this many training rows"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "keep at most this many held-out rows"})
    eval_fraction: float = field(default=0.1, metadata={"help": "fraction held out when there is no held-out split"})
    long_rows: str = field(default="drop", metadata={"help": "over max_seq_length: " + " | ".join(LONG_ROWS)})
    max_dropped_fraction: float = field(default=0.5, metadata={"help": "fail above this dropped fraction"})
    seed: int = field(default=42, metadata={"help": "seed of the shuffle and the split"})
    max_seq_length: int = field(default=1024, metadata={"help": "longest row in tokens (training)"})


# --- measuring ----------------------------------------------------------------------------------------------


def token_lengths(tokenizer, rows: list[dict], fmt: str, model: str) -> list[int]:
    """Lengths as the trainer sees them: the chat template for messages; for text and prompt + completion the
    tokenizer (which adds BOS) after TRL's appended EOS."""
    if not rows:
        return []
    if fmt in ("messages", "alpaca"):
        if not tokenizer.chat_template:
            raise StageError(
                f"the tokenizer of {model} has no chat template, so it cannot train on chat rows; "
                "use an instruct model or a text/prompt_completion dataset"
            )
        try:
            ids = tokenizer.apply_chat_template(
                [r["messages"] for r in rows], tokenize=True, return_dict=True
            )
        except Exception as err:  # jinja raises its own errors, e.g. "system role not supported"
            raise StageError(f"the chat template of {model} rejects these conversations: {err}") from None
    else:
        eos = tokenizer.eos_token or ""
        texts = [r["text"] if fmt == "text" else r["prompt"] + r["completion"] for r in rows]
        ids = tokenizer([t if t.endswith(eos) else t + eos for t in texts])
    return [len(x) for x in ids["input_ids"]]


def length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"min": 0, "mean": 0, "max": 0, "p95": 0}
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "mean": round(sum(ordered) / len(ordered), 1),
        "max": ordered[-1],
        "p95": ordered[math.ceil(0.95 * len(ordered)) - 1],
    }


# --- main ---------------------------------------------------------------------------------------------------


def check_options(cfg: Config) -> None:
    problems = [
        f"format must be one of {', '.join(FORMATS)}" * (cfg.format not in FORMATS),
        f"long_rows must be one of {', '.join(LONG_ROWS)}" * (cfg.long_rows not in LONG_ROWS),
        "eval_fraction must be in [0, 1)" * (not 0 <= cfg.eval_fraction < 1),
        "max_dropped_fraction must be in [0, 1]" * (not 0 <= cfg.max_dropped_fraction <= 1),
        "max_samples must be at least 1 or null" * (cfg.max_samples is not None and cfg.max_samples < 1),
        "max_eval_samples must be at least 1 or null" * (cfg.max_eval_samples is not None and cfg.max_eval_samples < 1),
        "max_seq_length must be at least 1" * (cfg.max_seq_length < 1),
    ]
    if any(problems):
        raise StageError("dataset settings: " + "; ".join(p for p in problems if p))


@dataclass
class Part:
    """The rows of one part (training, or the held-out split) after cleaning: (row, token length) pairs."""

    where: str
    input_rows: int
    pairs: list[tuple[dict, int]]
    counts: Counter
    long: int  # rows over max_seq_length (dropped or truncated)


def clean(rows: list[dict], where: str, fmt: str, text_field: str, tokenizer, model: str, cfg: Config,
          exclude: set[str] = frozenset()) -> Part:
    """Normalise, strip a leading BOS from text rows, drop empty and duplicate rows (and those in `exclude`: the
    training rows, for the held-out split), measure the tokens and apply dataset.long_rows."""
    bos = tokenizer.bos_token
    counts: Counter = Counter()
    kept, numbers, seen = [], [], set()
    for number, out in enumerate(normalise(rows, fmt, text_field, where), start=1):
        if fmt == "text" and bos and out["text"].startswith(bos):
            out["text"] = out["text"][len(bos) :]
            counts["bos_stripped"] += 1
        key = json.dumps(out, sort_keys=True)
        reason = "empty" if is_empty(out) else "duplicate" if key in seen else "in_train" if key in exclude else None
        if reason:
            counts[reason] += 1
            continue
        seen.add(key)
        kept.append(out)
        numbers.append(number)

    lengths = token_lengths(tokenizer, kept, fmt, model)
    long = [i for i, n in enumerate(lengths) if n > cfg.max_seq_length]
    if long and cfg.long_rows == "error":
        first = ", ".join(f"row {numbers[i]} ({lengths[i]} tokens)" for i in long[:5])
        raise StageError(
            f"{where}: {len(long)} rows longer than max_seq_length={cfg.max_seq_length} tokens: "
            f"{first}{', ...' * (len(long) > 5)}. Raise training.max_seq_length or set dataset.long_rows to "
            "drop or truncate"
        )
    pairs = list(zip(kept, lengths, strict=True))
    if cfg.long_rows == "drop":
        pairs = [(row, n) for row, n in pairs if n <= cfg.max_seq_length]
        counts["too_long"] = len(long)
    part = Part(where, len(rows), pairs, counts, len(long))
    check_dropped(part, fmt, text_field, cfg)
    return part


def check_dropped(part: Part, fmt: str, text_field: str, cfg: Config) -> None:
    dropped = {reason: part.counts[reason] for reason in (*DROP_REASONS, "in_train") if part.counts[reason]}
    if part.pairs and sum(dropped.values()) <= cfg.max_dropped_fraction * part.input_rows:
        return
    hints = {
        "empty": f"check dataset.format (resolved: {fmt}) and dataset.text_field ({text_field})",
        "duplicate": "the dataset repeats rows: deduplicate it or raise dataset.max_dropped_fraction",
        "too_long": f"raise training.max_seq_length ({cfg.max_seq_length}) or set long_rows truncate",
        "in_train": "the held-out split repeats the training rows: set dataset.eval_split none to hold out "
                    "dataset.eval_fraction of the training rows instead",
    }
    why = "no rows left" if not part.pairs else f"more than dataset.max_dropped_fraction={cfg.max_dropped_fraction}"
    raise StageError(
        f"{part.where}: {sum(dropped.values())} of {part.input_rows} rows dropped "
        f"({', '.join(f'{n} {reason}' for reason, n in dropped.items()) or 'none'}), {why}. Likely fix: "
        + ("; ".join(hints[reason] for reason in dropped) or "check dataset.path")
    )


def main(cfg: Config) -> dict:
    check_options(cfg)
    source = read_source(cfg.path, cfg.split, cfg.eval_split, cfg.config_name)
    where = f"dataset {cfg.path}" + (f" split {source.split}" if source.split else "")
    if not source.rows:
        raise StageError(f"{where} has no rows")
    found = columns(source.rows)
    fmt, text_field = resolve_format(found, cfg.format, cfg.text_field, cfg.path)
    log.info("read %d rows from %s: format %s%s", len(source.rows), where, fmt, f" ({text_field})" * (fmt == "text"))
    from transformers import AutoTokenizer

    model = model_dir(cfg.model_json)
    tokenizer = AutoTokenizer.from_pretrained(model)
    train = clean(source.rows, where, fmt, text_field, tokenizer, model, cfg)
    rng = random.Random(cfg.seed)
    rng.shuffle(train.pairs)
    pairs = train.pairs[: cfg.max_samples]
    if source.eval_rows is not None:
        held_where = f"dataset {cfg.path} split {source.eval_split}"
        if source.eval_rows and set(columns(source.eval_rows)) != set(found):
            log.warning("%s has the columns %s, the training split %s", held_where, columns(source.eval_rows), found)
        keys = {json.dumps(row, sort_keys=True) for row, _ in train.pairs}
        held = clean(source.eval_rows, held_where, fmt, text_field, tokenizer, model, cfg, exclude=keys)
        rng.shuffle(held.pairs)
        eval_pairs, train_pairs = held.pairs[: cfg.max_eval_samples], pairs
        log.info("held-out rows: split %s of the dataset (%d rows); dataset.eval_fraction does not apply",
                 source.eval_split, len(eval_pairs))
    else:
        held = None
        n_eval = max(1, round(len(pairs) * cfg.eval_fraction)) if cfg.eval_fraction > 0 and len(pairs) >= 2 else 0
        n_eval = min(n_eval, len(pairs) - 1, cfg.max_eval_samples or len(pairs))
        eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    train_rows, eval_rows = [row for row, _ in train_pairs], [row for row, _ in eval_pairs]

    report = {
        "source": cfg.path,
        "split": source.split,
        "splits": source.splits,
        "format": fmt,
        "text_field": text_field if fmt == "text" else None,
        "columns": found,
        "input_rows": len(source.rows),
        "kept": len(train.pairs),
        "dropped": {reason: train.counts[reason] for reason in DROP_REASONS},
        "truncated": train.long if cfg.long_rows == "truncate" else 0,
        "bos_stripped": train.counts["bos_stripped"],
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "eval_source": (
            {"kind": "split", "split": source.eval_split, "input_rows": held.input_rows, "kept": len(held.pairs),
             "dropped": {reason: held.counts[reason] for reason in (*DROP_REASONS, "in_train")}}
            if held else {"kind": "fraction", "eval_fraction": cfg.eval_fraction}
        ),
        "tokens": length_stats([n for _, n in train_pairs + eval_pairs]),
        "max_seq_length": cfg.max_seq_length,
        "long_rows": cfg.long_rows,
        "max_samples": cfg.max_samples,
        "max_eval_samples": cfg.max_eval_samples,
        "eval_fraction": cfg.eval_fraction,
        "seed": cfg.seed,
    }
    write_jsonl(cfg.train_out, train_rows)
    write_jsonl(cfg.eval_out, eval_rows)
    write_json(cfg.report_out, report)
    summary = [(k, report[k]) for k in ("format", "split", "input_rows", "kept", "train_rows", "eval_rows", "truncated")]
    summary.append(("held out", f"split {source.eval_split} ({held.input_rows} rows read)" if held
                    else f"eval_fraction {cfg.eval_fraction} of the training rows"))
    summary += [(f"dropped {k}", v) for k, v in report["dropped"].items()] + [("bos_stripped", report["bos_stripped"])]
    if held:
        summary += [(f"held-out dropped {k}", v) for k, v in report["eval_source"]["dropped"].items()]
    summary += [(f"tokens {k}", v) for k, v in report["tokens"].items()]
    log.info("%s", table(summary, f"data: {cfg.path}"))
    return report


if __name__ == "__main__":
    cli(main, Config, __doc__)
