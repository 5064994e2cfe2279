"""Evaluate stage: did fine-tuning help, and on what? The base and the fine-tuned model side by side on the test
set (the data stage's test.jsonl; when it is empty, the held-out eval rows, and the report says so): answer loss
and perplexity, both models' greedy answers to every scored prompt with exact match, token F1 and ROUGE-L, and
for label-style answers accuracy, macro precision/recall/F1 and the confusion matrix; optional lm-eval tasks.

    python scripts/evaluate.py --num-samples 256 --max-new-tokens 64 --batch-size 32 --merged true \
        --labels null --max-detected-labels 10 --lm-eval-tasks '[]' --lm-eval-limit 100 \
        --lm-eval-include-path null --model-json results/demo/model/model.json --finetuned results/demo/merged \
        --train-data results/demo/data/train.jsonl --eval-data results/demo/data/eval.jsonl \
        --test-data results/demo/data/test.jsonl --metrics-out results/demo/metrics/evaluate.json \
        --samples-out results/demo/eval/samples.jsonl --samples-csv results/demo/eval/samples.csv \
        --report-out results/demo/eval/report.txt

--finetuned is the merged model (--merged true: base and merged are loaded one after the other) or the adapter
directory (--merged false: base + adapter, the base's answers with the adapter disabled).

--part splits the stage so that an experiment scores each base model once (hpc_finetune.evaluate.parts):
`--part base` scores the base model alone (no --finetuned) and writes --metrics-out base.json and --samples-out
base.jsonl; `--part finetuned --base-metrics base.json --base-samples base.jsonl` scores the fine-tuned model and
writes what `--part both` (the default: both models here) writes, the base side taken from those files, which it
refuses when they were made on other rows or with other settings. Both parts give the metrics of --part both. Loss counts the answer
tokens only, rendered as the train stage rendered them (hpc_finetune.data.rows); hpc_finetune.evaluate scores,
generates and reports. Text rows have no separate answer: no generation for them. The label check runs before
any model is loaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from hpc_finetune.data.rows import detect_format, encode, prompt_ids, render
from hpc_finetune.data.testset import reference
from hpc_finetune.evaluate import harness, parts
from hpc_finetune.evaluate.groups import group_metrics, group_values, members
from hpc_finetune.evaluate.labels import check_references
from hpc_finetune.evaluate.metrics import (
    classification,
    classification_metrics,
    label_set,
    sample_rows,
    text_metrics,
)
from hpc_finetune.evaluate.report import report_text, summary_rows, write_samples_csv
from hpc_finetune.evaluate.scoring import answer_loss, generate
from hpc_finetune.io.cli import StageError, cli, log, plural, table
from hpc_finetune.io.files import iter_jsonl, model_dir, write_json, write_jsonl, write_text
from hpc_finetune.io.measure import peak_memory
from hpc_finetune.io.schema import option
from hpc_finetune.model.load import dtype_name, free, load_adapter, load_model, load_tokenizer, resolve_dtype
from hpc_finetune.serve.answers import engine, generation_record, vllm_answers


@dataclass
class Config:
    model_json: str = field(
        metadata={"help": "model record of the model stage (its 'path' is the base model)"}
    )
    train_data: str = field(metadata={"help": "train.jsonl (the loss of its first rows shows what was learnt)"})
    eval_data: str = field(metadata={"help": "eval.jsonl (scored when there is no test set; may be empty)"})
    metrics_out: str = field(metadata={"help": "metrics JSON (--part base: base.json)"})
    samples_out: str = field(metadata={"help": "JSONL: one record per scored prompt, both models' answers"})
    finetuned: str | None = field(
        default=None, metadata={"help": "merged model directory, or adapter directory with --merged false"}
    )
    part: str = field(default="both", metadata={"help": "both, base (the base model alone) or finetuned"})
    base_metrics: str | None = field(default=None, metadata={"help": "--part finetuned: the base part's base.json"})
    base_samples: str | None = field(default=None, metadata={"help": "--part finetuned: the base part's samples"})
    test_data: str | None = field(default=None, metadata={"help": "test.jsonl (empty or absent: no test set)"})
    samples_csv: str | None = field(default=None, metadata={"help": "the samples as CSV (a spreadsheet)"})
    report_out: str | None = field(default=None, metadata={"help": "the plain-text report"})
    num_samples: int | None = option("evaluate.num_samples")
    max_new_tokens: int = option("evaluate.max_new_tokens")
    batch_size: int = option("evaluate.batch_size")
    labels: list[str] | None = option("evaluate.labels")
    max_detected_labels: int = option("evaluate.max_detected_labels")
    lm_eval_tasks: list[str] = option("evaluate.lm_eval_tasks")
    lm_eval_limit: int | None = option("evaluate.lm_eval_limit")
    lm_eval_include_path: str | None = option("evaluate.lm_eval_include_path")
    group_field: str | None = option("evaluate.group_field")
    group_min_rows: int = option("evaluate.group_min_rows")
    engine: str = option("evaluate.engine")
    vllm: str = field(default="", metadata={"help": "vLLM's interpreter command, for --engine vllm or auto"})
    vllm_enforce_eager: bool = option("serve_check.enforce_eager")
    merged: bool = field(
        default=True, metadata={"help": "--finetuned is a merged model (true) or an adapter"}
    )
    max_train_rows: int = field(default=64, metadata={"help": "train rows whose loss is measured (the first ones)"})
    max_length: int = field(default=2048, metadata={"help": "longest sequence scored; longer ones are cut"})
    max_batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per loss batch"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU), ..."})


def read_rows(path: str | None, limit: int | None = None) -> list[dict]:
    """The rows of a data file (the first `limit` of them)."""
    if path is None:
        return []
    if not Path(path).is_file():
        raise StageError(f"data file {path} is missing; run the data stage first")
    return list(islice(iter_jsonl(path), limit))


def file_format(path: str | None, rows: list[dict], complete: bool = True, other_columns: bool = False) -> str | None:
    """The format of a data file's rows: of `rows`, or when they are not the whole file (`complete` false), of
    every row read one at a time (the training file can hold millions). other_columns: the test set, whose rows
    keep their other columns (evaluate.group_field reads one)."""
    return detect_format(rows if complete or path is None else iter_jsonl(path), path, other_columns)


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


def check_options(cfg: Config) -> None:
    if (cfg.num_samples is not None and cfg.num_samples < 1) or cfg.max_new_tokens < 1 or cfg.batch_size < 1:
        raise StageError("num_samples (or null), max_new_tokens and batch_size must be at least 1")
    if cfg.part not in parts.PARTS:
        raise StageError(f"--part {cfg.part!r} is not one of {', '.join(parts.PARTS)}")
    if cfg.part != "base" and not cfg.finetuned:
        raise StageError(f"--part {cfg.part} needs --finetuned (the merged model or the adapter)")
    if cfg.part == "finetuned" and not (cfg.base_metrics and cfg.base_samples):
        raise StageError("--part finetuned needs --base-metrics and --base-samples (the base part's outputs)")
    if cfg.part == "base" and (cfg.samples_csv or cfg.report_out):
        raise StageError("--part base writes --metrics-out and --samples-out only; the fine-tuned part writes the "
                         "CSV and the report")


def settings_of(cfg: Config, fmt: str | None, dtype: Any) -> dict:
    """What the base side depends on besides the rows: the base part's file must have been made with these."""
    names = ("num_samples", "max_new_tokens", "batch_size", "labels", "max_detected_labels", "lm_eval_tasks",
             "lm_eval_limit", "lm_eval_include_path", "max_train_rows", "max_length", "max_batch_tokens",
             "group_field", "group_min_rows")
    return {name: getattr(cfg, name) for name in names} | {"data_format": fmt, "dtype": dtype_name(dtype)}


def scored_rows(cfg: Config, test_rows: list[dict], eval_rows: list[dict]) -> tuple[list[dict], str, dict]:
    """The rows both models are scored on, their file, and what they are: the test set, else the eval rows."""
    rows, path, split = (test_rows, cfg.test_data, "test") if test_rows else (eval_rows, cfg.eval_data, "eval")
    chosen = rows[: cfg.num_samples]
    what = (f"the test set {path}" if split == "test" else
            "the held-out eval rows (no test set: dataset.test_path and a test split are unset; training watched "
            "these rows for its eval loss)")
    cap = f", the first {len(chosen)} of {len(rows)} (evaluate.num_samples)" if len(chosen) < len(rows) else ""
    return chosen, path, {"split": split, "path": path, "rows": len(rows), "scored": len(chosen),
                          "fallback": split == "eval", "description": f"{plural(len(chosen), 'row')} of {what}{cap}"}


def question_of(row: dict) -> str:
    """What the user asked: the last user turn, or the prompt."""
    if "messages" in row:
        users = [m["content"] for m in row["messages"][:-1] if m["role"] == "user"]
        return users[-1] if users else ""
    return row.get("prompt", "")


def lm_eval_models(cfg: Config, base_dir: str, dtype: Any) -> dict[str, str]:
    name = dtype_name(dtype)
    models = {"base": harness.model_args(base_dir, name)} if cfg.part != "finetuned" else {}
    if cfg.part != "base":
        models["finetuned"] = (harness.model_args(cfg.finetuned, name) if cfg.merged
                               else harness.model_args(base_dir, name, adapter=cfg.finetuned))
    return models


def metrics_of(cfg: Config, base_dir: str, dtype, fmt, scored: dict, losses: dict, samples: list, skipped: str | None,
               labels: tuple, lm_eval: dict | None, notes: list[str], start: float) -> dict:
    models = tuple(losses)  # both, or the base alone (--part base)
    base, tuned = losses["base"]["scored"], losses.get("finetuned", {"scored": {}, "train": {}})["scored"]
    ratio = base["loss"] / tuned["loss"] if base["loss"] is not None and tuned.get("loss") else None
    side = {name: {m: losses[m]["scored"][key] for m in models} | {"rows": base["rows"]}
            for name, key in (("answer_loss", "loss"), ("perplexity", "perplexity"))}
    side |= text_metrics(samples, models)
    result = classification(samples, labels[0], models) if labels[0] and samples else None
    side |= classification_metrics(result, models) if result else {}
    exact = side.get("exact_match", {})
    return {
        "base_model": base_dir, "finetuned": cfg.finetuned, "merged": cfg.merged, "dtype": dtype_name(dtype),
        "data_format": fmt, "scored_on": scored, "metrics": side, "classification": result,
        "labels_source": labels[1], "lm_eval": lm_eval,
        # flat keys that the summary, the model card and older readers use (the scored rows: test or eval)
        "base_eval_loss": base["loss"], "finetuned_eval_loss": tuned.get("loss"),
        "base_perplexity": base["perplexity"], "finetuned_perplexity": tuned.get("perplexity"),
        "eval_loss_ratio": ratio, "eval_loss_rows": base["rows"], "eval_loss_tokens": base["tokens"],
        "base_train_loss": losses["base"]["train"]["loss"],
        "finetuned_train_loss": losses.get("finetuned", {"train": {}})["train"].get("loss"),
        "train_loss_rows": losses["base"]["train"]["rows"],
        "base_eval_exact_match": exact.get("base"), "eval_exact_match": exact.get("finetuned"),
        "base_eval_token_f1": side.get("token_f1", {}).get("base"),
        "eval_token_f1": side.get("token_f1", {}).get("finetuned"),
        "num_samples": cfg.num_samples, "samples_generated": len(samples), "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens, "generation_skipped": skipped is not None,
        "generation_skipped_reason": skipped, "notes": notes,
        "samples_files": ", ".join(p for p in (cfg.samples_out, cfg.samples_csv) if p),
        "wall_time_s": round(time.time() - start, 2), "peak_memory": peak_memory(),
    }


def main(cfg: Config) -> dict:
    start = time.time()
    check_options(cfg)
    base_dir = model_dir(cfg.model_json)
    if cfg.part != "base":
        check_finetuned(cfg.finetuned, cfg.merged)
    # of the training rows only the first max_train_rows are scored: only they are held in memory
    train_rows = read_rows(cfg.train_data, cfg.max_train_rows)
    eval_rows, test_rows = read_rows(cfg.eval_data), read_rows(cfg.test_data)
    formats = {path: found for path, found in (
        (cfg.train_data, file_format(cfg.train_data, train_rows, complete=False)),
        (cfg.eval_data, file_format(cfg.eval_data, eval_rows)),
        (cfg.test_data, file_format(cfg.test_data, test_rows, other_columns=True)),
    ) if found}
    if len(set(formats.values())) > 1:
        raise StageError("the data files hold rows of different formats: "
                         + ", ".join(f"{path} {fmt}" for path, fmt in formats.items()))
    fmt = next(iter(formats.values()), None)
    rows, path, scored = scored_rows(cfg, test_rows, eval_rows)
    notes = ["no test set (dataset.test_path, a test split): scored on the held-out eval rows, which training "
             "watched for its eval loss"] * (scored["fallback"] and bool(rows))
    notes += ["nothing to score: no test rows and no eval rows"] * (not rows)
    every = [(n, reference(r) or "") for n, r in enumerate(test_rows or eval_rows, start=1) if fmt != "text"]
    if cfg.labels:  # the whole file, before any model is loaded
        check_references(every, cfg.labels, path)
    groups = group_values(rows, cfg.group_field, path) if cfg.group_field else None
    grouped = {g: i for g, i in members(groups).items() if len(i) >= cfg.group_min_rows} if groups else {}
    references = every[: len(rows)]
    labels = label_set([ref for _, ref in references], cfg.labels, cfg.max_detected_labels) if references else \
        (None, "none: no reference answers")
    dtype = resolve_dtype(cfg.dtype)
    tokenizer = load_tokenizer(cfg.finetuned or base_dir, base_dir)
    rendered = [render(r, tokenizer, fmt) for r in rows]
    encoded = [encode(tokenizer, r, fmt, cfg.max_length) for r in rendered]
    train_encoded = [encode(tokenizer, render(r, tokenizer, fmt), fmt, cfg.max_length)
                     for r in train_rows]
    skipped = ("text rows have no separate answer to compare a generation with" if fmt == "text"
               else "no rows to answer" if not rows else None)
    prompts = [prompt_ids(tokenizer, r, fmt) for r in rendered] if not skipped else []
    settings = settings_of(cfg, fmt, dtype)
    key = parts.digest(settings, encoded, train_encoded, prompts)
    # evaluate.engine vllm: vLLM's greedy answers, before any model of ours takes memory (hpc_finetune.serve); only
    # the models this part answers with
    wanted = {"both": ("base", "finetuned"), "base": ("base",), "finetuned": ("finetuned",)}[cfg.part]
    fast = vllm_answers(cfg.vllm, base_dir, cfg.finetuned, cfg.merged, prompts, tokenizer, cfg.max_new_tokens,
                        cfg.max_length, {"dtype": dtype_name(dtype), "enforce_eager": cfg.vllm_enforce_eager},
                        Path(cfg.samples_out).parent / "vllm", wanted) if prompts and engine(cfg) == "vllm" else {}

    generation_s: dict = {}

    def passes(model: Any, name: str) -> dict:
        pad, budget = tokenizer.pad_token_id, cfg.max_batch_tokens
        scores = {"scored": answer_loss(model, encoded, pad, budget), "train": answer_loss(model, train_encoded, pad, budget)}
        if groups:
            scores["groups"] = {g: answer_loss(model, [encoded[i] for i in index], pad, budget)
                                for g, index in grouped.items()}
        if prompts:
            log.info("%s model: %d greedy answers (up to %d tokens, batch %d, %s)", name, len(prompts),
                     cfg.max_new_tokens, cfg.batch_size, "vLLM" if fast else "transformers")
            started = time.time()
            scores["answers"] = fast[name.replace("-", "")] if fast else generate(
                model, tokenizer, prompts, cfg.max_new_tokens, cfg.max_length, cfg.batch_size)
            generation_s[name] = round(time.time() - started, 2)
        return scores

    stored = None
    if cfg.part == "finetuned":
        stored, base_scores = parts.read_base(cfg.base_metrics, cfg.base_samples, base_dir, settings, key,
                                              [r.prompt for r in rendered] if prompts else [])
        log.info("the base model's side from %s (%s)", cfg.base_metrics, scored["description"])
        if cfg.merged:
            log.info("scoring the merged model %s", cfg.finetuned)
            model = load_model(cfg.finetuned, dtype, "merged model")
        else:
            log.info("scoring base + adapter %s", cfg.finetuned)
            model = load_adapter(load_model(base_dir, dtype, "base model"), cfg.finetuned)
    else:
        log.info("scoring the base model %s on %s", base_dir, scored["description"])
        base = load_model(base_dir, dtype, "base model")
        if cfg.merged or cfg.part == "base":
            base_scores = passes(base, "base")
            model = base  # --part base: what `device` and the freeing below see
            del base
            if cfg.part == "both":
                del model
                free()
                log.info("scoring the merged model %s", cfg.finetuned)
                model = load_model(cfg.finetuned, dtype, "merged model")
        else:
            model = load_adapter(base, cfg.finetuned)
            with model.disable_adapter():
                base_scores = passes(model, "base")
            log.info("scoring base + adapter %s", cfg.finetuned)
    scores = {"base": base_scores}
    if cfg.part != "base":
        scores["finetuned"] = passes(model, "fine-tuned")
    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    del model
    free()
    notes += [f"generation skipped: {skipped}"] * bool(skipped)
    answers = {name: part.get("answers", []) for name, part in scores.items()}
    samples = sample_rows(scored["split"], rendered, [question_of(r) for r in rows], answers, labels[0], groups) \
        if prompts else []
    lm_eval = harness.run_tasks(cfg.lm_eval_tasks, cfg.lm_eval_limit, cfg.lm_eval_include_path,
                                lm_eval_models(cfg, base_dir, dtype), device, cfg.batch_size,
                                str(Path(cfg.samples_out).parent / "lm_eval"), known=(stored or {}).get("lm_eval"))
    if lm_eval and lm_eval["skipped"]:
        notes.append(f"lm-eval skipped: {lm_eval['skipped']}")
    metrics = metrics_of(cfg, base_dir, dtype, fmt, scored, scores, samples, skipped, labels, lm_eval, notes, start)
    if groups:
        metrics["groups"] = group_metrics(cfg.group_field, cfg.group_min_rows, groups, samples,
                                          {m: part["groups"] for m, part in scores.items()}, labels[0], tuple(scores))
    metrics["generation"] = generation_record(engine(cfg) if prompts else None, fast, generation_s)
    if stored and stored.get("generation"):  # the base part's generation, as --part both records it
        metrics["generation"]["models"] = stored["generation"]["models"] | metrics["generation"]["models"]
    write_jsonl(cfg.samples_out, samples)
    if cfg.part == "base":
        record = parts.base_record(metrics, base_scores, settings, key)
        write_json(cfg.metrics_out, record)
        log.info("\n%s", table(summary_rows(metrics), title="evaluation: the base model (--part base)"))
        return record
    if cfg.samples_csv:
        write_samples_csv(cfg.samples_csv, samples)
    write_json(cfg.metrics_out, metrics)
    if cfg.report_out:
        write_text(cfg.report_out, report_text(metrics))
    log.info("\n%s", table(summary_rows(metrics), title="evaluation: base -> fine-tuned"))
    return metrics


if __name__ == "__main__":
    cli(main, Config, __doc__)
