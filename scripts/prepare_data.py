"""Data stage: read a dataset (local file, save_to_disk directory, dataset repository or hub name; a dataset from a
bucket is the copy fetch_dataset.py made, whose record --origin names), normalise every row to a shape TRL's
SFTTrainer takes, validate it, shuffle, split train/eval and report what was kept and why.

    python scripts/prepare_data.py --path data/demo/medical_qa.jsonl --format auto --text-field text \
        --split train --eval-split auto --config-name null --max-samples null --max-eval-samples null \
        --eval-fraction 0.1 --long-rows drop --max-dropped-fraction 0.5 --seed 42 --max-seq-length 256 \
        --model-json results/demo/model/model.json --train-out results/demo/data/train.jsonl \
        --eval-out results/demo/data/eval.jsonl --report-out results/demo/data/report.json \
        --test-path null --test-split auto --test-out results/demo/data/test.jsonl

Every output row is exactly one of {"messages": [{"role", "content"}, ...]}, {"prompt", "completion"} or
{"text"} (hpc_finetune.data.source reads and normalises, hpc_finetune.data.clean cleans). A lone pre-templated
`prompt` column (the seed guide's format) becomes {"text"} without a leading BOS token (TRL adds one, and treats
any column named `prompt` as prompt/completion data). The held-out rows are the dataset's own
validation/eval/test split when it has one (dataset.eval_split), else dataset.eval_fraction of the rows; held-out
rows that repeat a training row are dropped. The test set (dataset.test_path, else the dataset's test split,
dataset.test_split) is read, checked row by row against the training format and cleaned the same way, without
rows that repeat a training or held-out row, keeping each row's other columns (a category, a source: what
evaluate.group_field names); only the evaluate stage scores it (an empty test.jsonl: none). Outputs are written only after validation passes: a failure keeps
the old ones.

The rows stream (hpc_finetune.data.clean): the stage keeps per row a digest, an offset into a scratch file beside
the outputs and a token length, so its memory does not grow with the rows they hold; the shuffle and the splits
work on row numbers, with the same random generator calls as on the rows themselves.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.data.clean import (
    DROP_REASONS,
    LONG_ROWS,
    Limits,
    Part,
    clean,
    length_histogram,
    length_stats,
)
from hpc_finetune.data.source import FORMATS, columns, read_source, resolve_format
from hpc_finetune.data.testset import read_test_path, require_fields
from hpc_finetune.io.cli import StageError, cli, log, plural, table
from hpc_finetune.io.files import model_dir, read_json, write_json, writing
from hpc_finetune.io.schema import option
from hpc_finetune.train.data import ARROW_CACHE


@dataclass
class Config:
    model_json: str = field(metadata={"help": "model record (model.json); its tokenizer measures the rows"})
    train_out: str = field(metadata={"help": "normalised training rows (JSONL)"})
    eval_out: str = field(metadata={"help": "normalised evaluation rows (JSONL)"})
    report_out: str = field(metadata={"help": "counts and token length statistics (JSON)"})
    path: str = option("dataset.path")
    format: str = option("dataset.format")
    text_field: str = option("dataset.text_field")
    split: str = option("dataset.split")
    eval_split: str = option("dataset.eval_split")
    config_name: str | None = option("dataset.config_name")
    max_samples: int | None = option("dataset.max_samples")
    max_eval_samples: int | None = option("dataset.max_eval_samples")
    eval_fraction: float = option("dataset.eval_fraction")
    long_rows: str = option("dataset.long_rows")
    max_dropped_fraction: float = option("dataset.max_dropped_fraction")
    seed: int = option("dataset.seed")
    max_seq_length: int = option("training.max_seq_length")
    origin: str | None = field(default=None, metadata={
        "help": "fetch record of a dataset from a bucket or the hub (fetch_dataset.py): the report says where --path "
                "came from"})
    test_path: str | None = option("dataset.test_path")
    test_split: str = option("dataset.test_split")
    test_out: str | None = field(default=None, metadata={"help": "normalised test rows (JSONL; empty: no test set)"})


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


def carve(pairs, cfg: Config) -> tuple:
    """(train, eval) rows when the dataset has no held-out split: dataset.eval_fraction of the rows, at least
    one when there are two or more, capped by max_eval_samples."""
    n_eval = max(1, round(len(pairs) * cfg.eval_fraction)) if cfg.eval_fraction > 0 and len(pairs) >= 2 else 0
    n_eval = min(n_eval, len(pairs) - 1, cfg.max_eval_samples or len(pairs))
    return pairs[n_eval:], pairs[:n_eval]


def test_part(cfg: Config, source, fmt: str, text_field: str, clean_rows, spill: str) -> tuple[Part | None, dict]:
    """The test set's rows, checked and cleaned (clean_rows(rows, where)), and where they came from."""
    if cfg.test_path:
        rows, where = read_test_path(cfg.test_path, cfg.config_name, spill), f"test set {cfg.test_path}"
        kind = {"kind": "path", "path": cfg.test_path}
        if source.test_rows is not None:
            log.info("dataset.test_path %s is the test set; the dataset's split %s is not used", cfg.test_path,
                     source.test_split)
    elif source.test_rows is not None:
        rows, where = source.test_rows, f"dataset {cfg.path} split {source.test_split}"
        kind = {"kind": "split", "split": source.test_split}
    else:
        return None, {"kind": "none"}
    require_fields(rows, fmt, text_field, where)
    part = clean_rows(rows, where)
    return part, kind | {"input_rows": part.input_rows, "kept": len(part.kept),
                         "dropped": {reason: part.counts[reason] for reason in (*DROP_REASONS, "in_train")}}


def make_report(cfg: Config, source, fmt: str, text_field: str, found: list[str], train: Part, held: Part | None,
                train_pairs, eval_pairs) -> dict:
    lengths = [train.kept.lengths[i] for i in train_pairs] + [(held or train).kept.lengths[i] for i in eval_pairs]
    return {
        "source": cfg.path, "split": source.split, "splits": source.splits, "format": fmt,
        "text_field": text_field if fmt == "text" else None, "columns": found, "input_rows": train.input_rows,
        "kept": len(train.kept), "dropped": {reason: train.counts[reason] for reason in DROP_REASONS},
        "truncated": train.long if cfg.long_rows == "truncate" else 0, "bos_stripped": train.counts["bos_stripped"],
        "train_rows": len(train_pairs), "eval_rows": len(eval_pairs),
        "eval_source": (
            {"kind": "split", "split": source.eval_split, "input_rows": held.input_rows, "kept": len(held.kept),
             "dropped": {reason: held.counts[reason] for reason in (*DROP_REASONS, "in_train")}}
            if held else {"kind": "fraction", "eval_fraction": cfg.eval_fraction}
        ),
        "tokens": length_stats(lengths),
        "token_histogram": length_histogram(lengths),
        "max_seq_length": cfg.max_seq_length,
        "long_rows": cfg.long_rows, "max_samples": cfg.max_samples, "max_eval_samples": cfg.max_eval_samples,
        "eval_fraction": cfg.eval_fraction, "seed": cfg.seed, "origin": origin(cfg.origin),
    }


def origin(record_path: str | None) -> dict | None:
    """Where a fetched dataset came from: its s3:// URL, the endpoint, and every object's key, ETag and size; or
    the hub dataset, the revision asked for and the commit read."""
    if not record_path:
        return None
    record = read_json(record_path)
    if record.get("kind") == "hub":
        return {k: record[k] for k in ("kind", "repo_id", "revision", "commit", "endpoint")} | {
            "source": record["url"], "files": len(record["objects"])}
    return {"source": record["url"], "endpoint": record["endpoint"], "digest": record["digest"],
            "objects": [{k: o[k] for k in ("key", "etag", "bytes")} for o in record["objects"]]}


def summary_rows(report: dict) -> list[tuple[str, object]]:
    held = report["eval_source"]
    rows = [(k, report[k]) for k in ("format", "split", "input_rows", "kept", "train_rows", "eval_rows", "truncated")]
    rows.append(("held out", f"split {held['split']} ({plural(held['input_rows'], 'row')} read)" if held["kind"] == "split"
                 else f"eval_fraction {held['eval_fraction']} of the training rows"))
    test = report.get("test_source", {"kind": "none"})
    where = {"path": test.get("path"), "split": f"split {test.get('split')}"}.get(test["kind"])
    rows.append(("test set", f"{where}: {plural(test.get('kept'), 'row')}" if where else
                 "none (the evaluate stage scores the held-out rows)"))
    rows += [(f"dropped {k}", v) for k, v in report["dropped"].items()] + [("bos_stripped", report["bos_stripped"])]
    rows += [(f"held-out dropped {k}", v) for k, v in held.get("dropped", {}).items()]
    return rows + [(f"tokens {k}", v) for k, v in report["tokens"].items()]


def main(cfg: Config) -> dict:
    check_options(cfg)
    Path(cfg.train_out).parent.mkdir(parents=True, exist_ok=True)
    # the scratch beside the outputs: the kept rows, and a dataset repository's Arrow form (not left in HF_HOME)
    spill = tempfile.mkdtemp(dir=Path(cfg.train_out).parent, prefix=".prepare_data.")
    parts: list[Part] = []
    try:
        return prepare(cfg, spill, parts)
    finally:
        for part in parts:
            part.kept.close()
        shutil.rmtree(spill, ignore_errors=True)


def prepare(cfg: Config, spill: str, parts: list[Part]) -> dict:
    source = read_source(cfg.path, cfg.split, cfg.eval_split, cfg.config_name,
                         "none" if cfg.test_path else cfg.test_split, cache_dir=spill)
    where = f"dataset {cfg.path}" + (f" split {source.split}" if source.split else "")
    if not source.rows:
        raise StageError(f"{where} has no rows")
    found = columns(source.rows)
    fmt, text_field = resolve_format(found, cfg.format, cfg.text_field, cfg.path)
    log.info("read %s from %s: format %s%s", plural(len(source.rows), "row"), where, fmt, f" ({text_field})" * (fmt == "text"))
    from transformers import AutoTokenizer

    model = model_dir(cfg.model_json)
    tokenizer = AutoTokenizer.from_pretrained(model)
    limits = Limits(cfg.max_seq_length, cfg.long_rows, cfg.max_dropped_fraction)

    def clean_part(rows, where: str, exclude: set = frozenset(), keep_columns: bool = False) -> Part:
        parts.append(clean(rows, where, fmt, text_field, tokenizer, model, limits, spill, exclude, keep_columns))
        return parts[-1]

    return split_and_write(cfg, source, where, fmt, text_field, found, clean_part, spill)


def shuffled(rng: random.Random, n: int) -> array:
    """Row numbers 0..n-1 in the order rng.shuffle gives a list of n rows (it draws from the length alone)."""
    order = array("q", range(n))
    rng.shuffle(order)
    return order


def split_and_write(cfg: Config, source, where: str, fmt: str, text_field: str, found: list[str], clean_part,
                    spill: str) -> dict:
    train = clean_part(source.rows, where)
    rng = random.Random(cfg.seed)
    order = shuffled(rng, len(train.kept))
    pairs, held = order[: cfg.max_samples], None
    if source.eval_rows is not None:
        held_where = f"dataset {cfg.path} split {source.eval_split}"
        if source.eval_rows and set(columns(source.eval_rows)) != set(found):
            log.warning("%s has the columns %s, the training split %s", held_where, columns(source.eval_rows), found)
        held = clean_part(source.eval_rows, held_where, exclude=train.keys)
        train_pairs, eval_pairs = pairs, shuffled(rng, len(held.kept))[: cfg.max_eval_samples]
        log.info("held-out rows: split %s of the dataset (%s); dataset.eval_fraction does not apply",
                 source.eval_split, plural(len(eval_pairs), "row"))
    else:
        train_pairs, eval_pairs = carve(pairs, cfg)
    seen = train.keys  # the training rows' digests, and now the held-out rows' too
    if held:
        seen.update(held.kept.digests[i] for i in eval_pairs)
    test, test_source = test_part(cfg, source, fmt, text_field,  # the test rows keep their other columns
                                  lambda rows, where: clean_part(rows, where, seen, keep_columns=True), spill)
    test_order = shuffled(rng, len(test.kept)) if test else []
    report = make_report(cfg, source, fmt, text_field, found, train, held, train_pairs, eval_pairs)
    report |= {"test_rows": len(test.kept) if test else 0, "test_source": test_source}
    outputs = [(cfg.train_out, train, train_pairs), (cfg.eval_out, held or train, eval_pairs)]
    with contextlib.ExitStack() as files:  # each output replaces the old one only when all are written
        for path, part, order in outputs + [(cfg.test_out, test, test_order)] * bool(cfg.test_out):
            fh = files.enter_context(writing(path))
            for i in order:
                fh.write(part.kept.row(i))
    write_json(cfg.report_out, report)
    for out in {Path(cfg.train_out).parent, Path(cfg.eval_out).parent}:  # the train stage's Arrow of the old data
        shutil.rmtree(out / ARROW_CACHE, ignore_errors=True)
    log.info("%s", table(summary_rows(report), f"data: {cfg.path}"))
    return report


if __name__ == "__main__":
    cli(main, Config, __doc__)
