"""Data stage: read a dataset (local file, save_to_disk directory or hub name), normalise every row to a shape
TRL's SFTTrainer takes, validate it, shuffle, split train/eval and report what was kept and why.

    python scripts/prepare_data.py --path data/demo/medical_qa.jsonl --format auto --text-field text \
        --split train --config-name null --max-samples null --eval-fraction 0.1 --long-rows drop \
        --max-dropped-fraction 0.5 --seed 42 --max-seq-length 256 --model-json results/demo/model/model.json \
        --train-out results/demo/data/train.jsonl --eval-out results/demo/data/eval.jsonl \
        --report-out results/demo/data/report.json

Every output row is exactly one of {"messages": [{"role", "content"}, ...]}, {"prompt", "completion"} or
{"text"}. ShareGPT `conversations` and alpaca rows become messages. A lone pre-templated `prompt` column (the
seed guide's format) becomes {"text"} without a leading BOS token (TRL adds one, and treats any column named
`prompt` as prompt/completion data). Outputs are written only after validation passes: a failure keeps the
old ones.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common import StageError, cli, log, model_dir, read_jsonl, table, write_json, write_jsonl

FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "text")
LONG_ROWS = ("drop", "truncate", "error")
ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", **ROLES}
FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")


@dataclass
class Config:
    path: str = field(
        metadata={"help": "json/jsonl/csv/parquet/arrow file, save_to_disk dir or hub org/name"}
    )
    model_json: str = field(metadata={"help": "model record (model.json); its tokenizer measures the rows"})
    train_out: str = field(metadata={"help": "normalised training rows (JSONL)"})
    eval_out: str = field(metadata={"help": "normalised evaluation rows (JSONL)"})
    report_out: str = field(metadata={"help": "counts and token length statistics (JSON)"})
    format: str = field(default="auto", metadata={"help": " | ".join(FORMATS)})
    text_field: str = field(default="text", metadata={"help": "column with the training text (format text)"})
    split: str = field(default="train", metadata={"help": "split of a hub dataset or DatasetDict dir"})
    config_name: str | None = field(default=None, metadata={"help": "configuration of a hub dataset"})
    max_samples: int | None = field(default=None, metadata={"help": "keep at most this many rows"})
    eval_fraction: float = field(default=0.1, metadata={"help": "fraction held out for evaluation"})
    long_rows: str = field(default="drop", metadata={"help": "over max_seq_length: " + " | ".join(LONG_ROWS)})
    max_dropped_fraction: float = field(default=0.5, metadata={"help": "fail above this dropped fraction"})
    seed: int = field(default=42, metadata={"help": "seed of the shuffle and the split"})
    max_seq_length: int = field(default=1024, metadata={"help": "longest row in tokens (training)"})


class RowError(ValueError):
    """A row that does not fit the format; main() adds the source and the row number."""


# --- reading ------------------------------------------------------------------------------------------------


def read_rows(cfg: Config) -> list[dict]:
    path = Path(cfg.path)
    suffix = path.suffix.lower()
    if path.is_dir():
        return read_saved(path, cfg.split)
    if path.is_file():
        readers = {".json": read_json_rows, ".jsonl": read_jsonl, ".csv": read_csv}
        if suffix not in FILE_TYPES:
            raise StageError(
                f"dataset {path}: unsupported file type {suffix or '(none)'!r}; use a "
                f"{'/'.join(FILE_TYPES)} file, a save_to_disk directory or a hub dataset name org/name"
            )
        return readers.get(suffix, read_arrow)(path)  # .parquet, .arrow
    if suffix in FILE_TYPES or not re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.path):
        raise StageError(
            f"dataset {cfg.path} not found; set dataset.path to a file, a directory or a hub name org/name"
        )
    return read_hub(cfg.path, cfg.config_name, cfg.split)


def read_json_rows(path: Path) -> list[dict]:
    """A JSON array of objects, or JSON lines in a .json file."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return read_jsonl(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise StageError(
            f"{path} line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise StageError(f"{path} item {number}: expected a JSON object, got {type(row).__name__}")
    return rows


def read_csv(path: Path) -> list[dict]:
    csv.field_size_limit(2**31 - 1)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, strict=True)
        try:
            header = next(reader, [])
            rows = []
            for values in filter(None, reader):  # blank lines are skipped
                if len(values) != len(header):
                    raise StageError(
                        f"{path} line {reader.line_num}: {len(values)} fields, the header {len(header)}"
                    )
                rows.append(dict(zip(header, values, strict=True)))
        except csv.Error as err:
            raise StageError(f"{path} line {reader.line_num}: not valid CSV ({err})") from None
    return rows


def read_arrow(path: Path) -> list[dict]:
    """Parquet, or an Arrow IPC file (the stream format datasets writes, or the file format)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path).to_pylist()
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_stream(source).read_all().to_pylist()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all().to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise StageError(f"{path}: cannot read it as {path.suffix[1:]}: {err}") from None


def read_saved(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise StageError(
            f"dataset {path}: a directory, but not one saved with datasets' save_to_disk ({err})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise StageError(
                f"dataset {path}: no split {split!r} (it has {', '.join(ds)}); set dataset.split"
            )
        ds = ds[split]
    return ds.to_list()


def read_hub(name: str, config_name: str | None, split: str) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, config_name, split=split).to_list()
    except Exception as err:  # offline, unknown name, missing split or config: all need the same advice
        raise StageError(
            f"cannot load the hub dataset {name!r} (config {config_name}, split {split}): "
            f"{type(err).__name__}: {err}. Without internet (or with HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set) "
            "set dataset.path to a local file, or pre-download it on a node with internet: "
            f"datasets.load_dataset({name!r}, {config_name!r}, "
            f"split={split!r}).save_to_disk(DIR), then set dataset.path to DIR"
        ) from None


# --- formats ------------------------------------------------------------------------------------------------


def string(value, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"{name} is {type(value).__name__}, expected a string")
    return value


def to_messages(row: dict, _field: str) -> dict:
    key = "messages" if "messages" in row else "conversations"
    turns = row.get(key) or []
    if not isinstance(turns, list):
        raise RowError(f"{key} is {type(turns).__name__}, expected a list of messages")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"{key}[{i}] is {type(turn).__name__}, expected an object with role and content")
        role_key, content_key, roles = (
            ("role", "content", ROLES) if "role" in turn else ("from", "value", SHAREGPT_ROLES)
        )
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise RowError(f"{key}[{i}].{role_key} {role!r} is not one of {', '.join(roles)}")
        messages.append(
            {"role": roles[role], "content": string(turn.get(content_key), f"{key}[{i}].{content_key}")}
        )
    return {"messages": messages}


def to_alpaca(row: dict, _field: str) -> dict:
    instruction, extra, output, system = (
        string(row.get(k), k) for k in ("instruction", "input", "output", "system")
    )
    if not instruction.strip():
        return {"messages": []}  # empty
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return {
        "messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    }


def to_prompt_completion(row: dict, _field: str) -> dict:
    return {
        "prompt": string(row.get("prompt"), "prompt"),
        "completion": string(row.get("completion"), "completion"),
    }


def to_text(row: dict, text_field: str) -> dict:
    return {"text": string(row.get(text_field), text_field)}


NORMALISE = {
    "messages": to_messages,
    "prompt_completion": to_prompt_completion,
    "alpaca": to_alpaca,
    "text": to_text,
}


def is_empty(row: dict) -> bool:
    if "messages" in row:
        return not any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"])
    return not all(value.strip() for value in row.values())


def resolve_format(columns: list[str], cfg: Config) -> tuple[str, str]:
    """The format and text field: forced by cfg.format, or detected from the columns in FORMATS order."""
    text_field = cfg.text_field
    needs = {
        "messages": (
            "messages (or ShareGPT conversations)",
            "messages" in columns or "conversations" in columns,
        ),
        "prompt_completion": ("prompt and completion", {"prompt", "completion"} <= set(columns)),
        "alpaca": ("instruction and output", {"instruction", "output"} <= set(columns)),
        "text": (f"{text_field!r} (dataset.text_field)", text_field in columns),
    }
    if cfg.format != "auto":
        if needs[cfg.format][1]:
            return cfg.format, text_field
        problem = f"format {cfg.format} needs the column(s) {needs[cfg.format][0]}"
    else:
        detected = next((name for name, (_, found) in needs.items() if found), None)
        if detected:
            return detected, text_field
        if "prompt" in columns:
            return "text", "prompt"
        problem = "cannot detect the format: expected " + "; ".join(
            f"{n}: {w}" for n, (w, _) in needs.items()
        )
        problem += "; or a lone pre-templated prompt column"
    raise StageError(
        f"dataset {cfg.path}: {problem}, but its columns are {', '.join(columns)}. "
        "Set dataset.format and dataset.text_field to match the data"
    )


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
        "max_seq_length must be at least 1" * (cfg.max_seq_length < 1),
    ]
    if any(problems):
        raise StageError("dataset settings: " + "; ".join(p for p in problems if p))


def main(cfg: Config) -> dict:
    check_options(cfg)
    rows = read_rows(cfg)
    if not rows:
        raise StageError(f"dataset {cfg.path} has no rows")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    fmt, text_field = resolve_format(columns, cfg)
    log.info(
        "read %d rows from %s: format %s%s", len(rows), cfg.path, fmt, f" ({text_field})" * (fmt == "text")
    )
    from transformers import AutoTokenizer

    model = model_dir(cfg.model_json)
    tokenizer = AutoTokenizer.from_pretrained(model)
    bos = tokenizer.bos_token

    counts: Counter = Counter()
    kept, numbers, seen = [], [], set()
    for number, row in enumerate(rows, start=1):
        try:
            out = NORMALISE[fmt](row, text_field)
        except RowError as err:
            raise StageError(f"dataset {cfg.path} row {number}: {err} (format {fmt})") from None
        if fmt == "text" and bos and out["text"].startswith(bos):
            out["text"] = out["text"][len(bos) :]
            counts["bos_stripped"] += 1
        key = json.dumps(out, sort_keys=True)
        reason = "empty" if is_empty(out) else "duplicate" if key in seen else None
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
            f"dataset {cfg.path}: {len(long)} rows longer than max_seq_length={cfg.max_seq_length} tokens: "
            f"{first}{', ...' * (len(long) > 5)}. Raise training.max_seq_length or set dataset.long_rows to "
            "drop or truncate"
        )
    pairs = list(zip(kept, lengths, strict=True))
    if cfg.long_rows == "drop":
        pairs = [(row, n) for row, n in pairs if n <= cfg.max_seq_length]
        counts["too_long"] = len(long)
    dropped = {reason: counts[reason] for reason in ("empty", "duplicate", "too_long")}
    if not pairs or sum(dropped.values()) > cfg.max_dropped_fraction * len(rows):
        hints = {
            "empty": f"check dataset.format (resolved: {fmt}) and dataset.text_field ({text_field})",
            "duplicate": "the dataset repeats rows: deduplicate it or raise dataset.max_dropped_fraction",
            "too_long": f"raise training.max_seq_length ({cfg.max_seq_length}) or set long_rows truncate",
        }
        why = (
            "no rows left"
            if not pairs
            else f"more than dataset.max_dropped_fraction={cfg.max_dropped_fraction}"
        )
        raise StageError(
            f"dataset {cfg.path}: {sum(dropped.values())} of {len(rows)} rows dropped "
            f"({', '.join(f'{n} {reason}' for reason, n in dropped.items())}), {why}. Likely fix: "
            + "; ".join(hints[reason] for reason, n in dropped.items() if n)
        )

    random.Random(cfg.seed).shuffle(pairs)
    pairs = pairs[: cfg.max_samples]
    n_eval = max(1, round(len(pairs) * cfg.eval_fraction)) if cfg.eval_fraction > 0 and len(pairs) >= 2 else 0
    n_eval = min(n_eval, len(pairs) - 1)
    eval_rows, train_rows = [row for row, _ in pairs[:n_eval]], [row for row, _ in pairs[n_eval:]]

    report = {
        "source": cfg.path,
        "format": fmt,
        "text_field": text_field if fmt == "text" else None,
        "columns": columns,
        "input_rows": len(rows),
        "kept": len(kept) - counts["too_long"],
        "dropped": dropped,
        "truncated": len(long) if cfg.long_rows == "truncate" else 0,
        "bos_stripped": counts["bos_stripped"],
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "tokens": length_stats([n for _, n in pairs]),
        "max_seq_length": cfg.max_seq_length,
        "long_rows": cfg.long_rows,
        "max_samples": cfg.max_samples,
        "eval_fraction": cfg.eval_fraction,
        "seed": cfg.seed,
    }
    write_jsonl(cfg.train_out, train_rows)
    write_jsonl(cfg.eval_out, eval_rows)
    write_json(cfg.report_out, report)
    summary = [
        (k, report[k]) for k in ("format", "input_rows", "kept", "train_rows", "eval_rows", "truncated")
    ]
    summary += [(f"dropped {k}", v) for k, v in dropped.items()] + [("bos_stripped", report["bos_stripped"])]
    summary += [(f"tokens {k}", v) for k, v in report["tokens"].items()]
    log.info("%s", table(summary, f"data: {cfg.path}"))
    return report


if __name__ == "__main__":
    cli(main, Config, __doc__)
