"""The evaluate stage's side-by-side results as people read them: comparison_rows() (one row per metric: name,
base, fine-tuned, rows used; the log table, eval/report.txt and the HTML report all show these), the plain-text
report, and eval/samples.csv.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from hpc_finetune.evaluate.labels import UNMATCHED
from hpc_finetune.evaluate.metrics import MODELS
from hpc_finetune.io.cli import plural

# metric key in evaluate.json "metrics" -> the name people read; in this order
NAMES = {
    "answer_loss": "answer loss", "perplexity": "perplexity", "exact_match": "exact match",
    "token_f1": "token F1", "rouge_l": "ROUGE-L F", "accuracy": "accuracy", "macro_precision": "macro precision",
    "macro_recall": "macro recall", "macro_f1": "macro F1",
}
LOWER_IS_BETTER = {"answer_loss", "perplexity"}
SAMPLE_COLUMNS = ("index", "split", "question", "reference", "base_answer", "finetuned_answer", "base_exact",
                  "finetuned_exact", "base_f1", "finetuned_f1", "base_rouge_l", "finetuned_rouge_l")
LABEL_COLUMNS = ("reference_label", "base_label", "finetuned_label", "base_correct", "finetuned_correct")


def comparison_rows(metrics: dict) -> list[tuple[str, float | None, float | None, int]]:
    """(metric, base, fine-tuned, rows) for every side-by-side metric of an evaluate.json, in reading order:
    answer loss, perplexity, exact match, token F1, ROUGE-L, the classification metrics when there are labels,
    then each lm-eval task's metrics ("lm-eval <task> <metric>"). Values are numbers or None (not measured)."""
    found = metrics.get("metrics", {})
    rows = [(NAMES.get(key, key), v["base"], v.get("finetuned"), v["rows"]) for key, v in found.items()]
    for task, values in (metrics.get("lm_eval") or {}).get("results", {}).items():
        rows += [(f"lm-eval {task} {name}", v["base"], v.get("finetuned"), v["rows"]) for name, v in values.items()]
    return rows


def ahead(metrics: dict) -> dict[str, str]:
    """Per metric name (as comparison_rows names it): 'fine-tuned', 'base', 'tie' or '' (not comparable)."""
    lower = {NAMES[key] for key in LOWER_IS_BETTER}
    out = {}
    for name, base, tuned, _ in comparison_rows(metrics):
        if base is None or tuned is None:
            out[name] = ""
        else:
            delta = (base - tuned) if name in lower else (tuned - base)
            out[name] = "tie" if abs(delta) < 1e-12 else "fine-tuned" if delta > 0 else "base"
    return out


def fmt(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def summary_rows(m: dict) -> list[tuple[str, Any]]:
    """The log's summary table."""
    rows = [(name, f"{fmt(base)} -> {fmt(tuned)}  ({plural(n, 'row')})") for name, base, tuned, n in comparison_rows(m)]
    rows += [
        ("scored on", m["scored_on"]["description"]),
        ("train loss base -> tuned", f"{fmt(m['base_train_loss'])} -> {fmt(m['finetuned_train_loss'])}"),
        ("answers per model", f"{m['samples_generated']} (batch {m['batch_size']})"),
        ("labels", ", ".join(m["classification"]["labels"]) if m.get("classification") else "none"),
        ("lm-eval", lm_eval_line(m.get("lm_eval"))),
        *((f"worst group ({model})", f"{w['group']} ({w['metric']} {fmt(w['value'])})")
          for model, w in (m.get("groups") or {}).get("worst", {}).items() if w),
        ("wall time", f"{m['wall_time_s']} s"),
        ("peak memory", m["peak_memory"]),
    ]
    return rows + [("note", note) for note in m["notes"]]


def lm_eval_line(result: dict | None) -> str:
    if not result:
        return "no tasks (evaluate.lm_eval_tasks)"
    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    return f"{', '.join(result['tasks'])} (limit {result['limit']})"


def text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(f"{str(c):<{w}}" if i == 0 else f"{str(c):>{w}}" for i, (c, w) in  # noqa: E731
                               enumerate(zip(r, widths, strict=True))).rstrip()
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def report_text(m: dict) -> str:
    """eval/report.txt: what was scored, the side-by-side table, the label breakdown, lm-eval, notes."""
    better = ahead(m)
    out = [f"Evaluation: fine-tuned {m['finetuned']} vs base {m['base_model']}", "",
           f"Scored on: {m['scored_on']['description']}",
           f"Data format {m['data_format']}; greedy answers, up to {m['max_new_tokens']} new tokens, batch "
           f"{m['batch_size']}; dtype {m['dtype']}", ""]
    out += text_table(["metric", "base", "fine-tuned", "rows", "ahead"],
                      [[name, fmt(b), fmt(t), str(n), better[name]] for name, b, t, n in comparison_rows(m)])
    out += ["", "Answer loss: mean negative log-likelihood per reference-answer token; perplexity = exp(loss).",
            "Exact match: the answer equals the reference (surrounding white space ignored). Token F1 and ROUGE-L F:",
            "on lower-cased words without punctuation (ROUGE-L: longest common subsequence)."]
    result = m.get("classification")
    if result:
        out += ["", f"Classification: labels {', '.join(result['labels'])} ({m['labels_source']})",
                "An answer is the label it equals, else the one it starts with, else the only one it contains",
                f"(lower case, punctuation removed); otherwise {UNMATCHED}, which counts as wrong."]
        for model in MODELS:
            part = result[model]
            out += ["", f"{model}: accuracy {fmt(part['accuracy'])}, macro F1 {fmt(part['macro_f1'])}, "
                        f"{part['unmatched']} of {result['rows']} answers unmatched"]
            out += text_table(["label", "support", "predicted", "correct", "precision", "recall", "F1"],
                              [[label, str(c["support"]), str(c["predicted"]), str(c["correct"]), fmt(c["precision"]),
                                fmt(c["recall"]), fmt(c["f1"])] for label, c in part["per_label"].items()])
            columns = [*result["labels"], UNMATCHED]
            out += ["confusion (rows: reference, columns: answer)"]
            out += text_table(["reference", *columns],
                              [[label, *(str(part["confusion"][label][c]) for c in columns)] for label in result["labels"]])
    out += group_text(m["groups"]) if m.get("groups") else []
    out += ["", f"lm-eval: {lm_eval_line(m.get('lm_eval'))}"]
    out += ["", "Notes:", *(f"- {note}" for note in m["notes"])] if m["notes"] else []
    out += ["", f"Per-sample answers and scores: {m['samples_files']}"]
    return "\n".join(out) + "\n"


def write_samples_csv(path: str | Path, samples: list[dict]) -> None:
    """One row per prompt, quoted as csv does (answers with commas, quotes and newlines stay in their cell); UTF-8
    with a byte-order mark, so that spreadsheet programs read it as UTF-8."""
    columns = list(SAMPLE_COLUMNS) + [c for c in LABEL_COLUMNS if samples and c in samples[0]]
    if samples and "group" in samples[0]:  # evaluate.group_field
        columns.insert(columns.index("split") + 1, "group")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8-sig") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(samples)
    tmp.replace(path)


# The groups section of evaluate.json (hpc_finetune.evaluate.groups) as tables people read.


def group_tables(section: dict) -> dict:
    """The groups section as tables people read (eval/report.txt and the HTML report): `metrics` (header, rows:
    every metric per scored group, 'base -> fine-tuned'), `small` (the groups too small to score, why), `rates`
    (header, rows: FPR and FNR per group, model and label) and `worst` (one line per model)."""
    scored = {g: e for g, e in section["groups"].items() if e["scored"]}
    keys = list(next(iter(scored.values()))["metrics"]) if scored else []
    both = lambda v: f"{fmt(v['base'])} -> {fmt(v['finetuned'])}" if "finetuned" in v else fmt(v["base"])  # noqa: E731
    rates = [[g, model, label, fmt(r["false_positive_rate"]), fmt(r["false_negative_rate"]), str(r["positives"]),
              str(r["negatives"])]
             for g, e in scored.items() for model, per in e.get("error_rates", {}).items() for label, r in per.items()]
    return {
        "title": f"Groups: evaluate.group_field {section['field']!r}; a group needs at least {section['min_rows']} "
                 "scored rows (evaluate.group_min_rows)",
        "metrics": (["group", "rows", *(NAMES.get(k, k) for k in keys)],
                    [[g, str(e["rows"]), *(both(e["metrics"][k]) for k in keys)] for g, e in scored.items()]),
        "small": [f"{g}: {e['reason']}" for g, e in section["groups"].items() if not e["scored"]],
        "rates": (["group", "model", "label", "FPR", "FNR", "positives", "negatives"], rates),
        "worst": [f"worst group ({model}): {w['group']} by {NAMES.get(w['metric'], w['metric'])} {fmt(w['value'])}"
                  for model, w in section["worst"].items() if w],
    }


RATES_TITLE = "False-positive / false-negative rate per group, model and label (one label against the rest)"


def group_text(section: dict) -> list[str]:
    """The groups part of eval/report.txt (group_tables as text)."""
    tables = group_tables(section)
    out = ["", tables["title"], *text_table(*tables["metrics"]), *tables["small"]]
    if tables["rates"][1]:
        out += ["", RATES_TITLE, *text_table(*tables["rates"])]
    return out + tables["worst"]
