"""The report's tables as HTML fragments: the evaluation (metrics, answers side by side), the data report, stage
timings and peak memory, the effective configuration. Every value is escaped; nothing here imports matplotlib."""

from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path
from typing import Any

ANSWER_CHARS = 600  # a cell of the answers table shows at most this much of a prompt or an answer


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def html_table(header: tuple | list | None, rows: list, cls: str = "") -> str:
    head = "" if not header else "<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + \
        "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def cut(text: Any, limit: int = ANSWER_CHARS) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit] + " …"


def prompt_tail(text: Any, limit: int = 300) -> str:
    """The question of a rendered prompt: the last message of a chat template's text (its special tokens and
    role headers dropped), else the prompt's end."""
    text = "" if text is None else str(text)
    pieces = [p.strip() for p in re.split(r"<\|[^|<>]{1,40}\|>", text)]
    pieces = [p for p in pieces if p and p not in ("system", "user", "assistant")]
    text = pieces[-1] if len(pieces) > 1 else text.strip()
    return text if len(text) <= limit else "… " + text[-limit:]


def evaluation_html(metrics: dict, samples: list[dict], max_answers: int = 6) -> str:
    """The evaluate stage's result as HTML: its side-by-side rows (hpc_finetune.evaluate.report.comparison_rows:
    metric, base, fine-tuned, rows, and which is ahead) and the first answers of both models next to the reference."""
    from hpc_finetune.evaluate.report import ahead, comparison_rows

    better = ahead(metrics)
    table = html_table(("metric", "base", "fine-tuned", "rows", "ahead"),
                       [(name, base, tuned, n, better.get(name, "")) for name, base, tuned, n in comparison_rows(metrics)],
                       "metrics")
    keys = list(dict.fromkeys(k for s in samples for k in s))
    first = [k for k in ("question", "reference", "base_answer", "finetuned_answer") if k in keys]
    if "question" not in keys and "prompt" in keys:
        first.insert(0, "prompt")
    scores = [k for k in keys if k.startswith(("base_", "finetuned_")) and k not in first]
    columns = first + scores
    shown = samples[:max_answers]
    answers_table = html_table(columns, [[prompt_tail(s.get(k)) if k == "prompt" else cut(s.get(k))
                                          for k in columns] for s in shown], "answers")
    if metrics.get("groups"):  # evaluate.group_field

        table += group_html(metrics["groups"])
    return (f"<h2>Base vs fine-tuned</h2>{table}<h2>Answers side by side</h2>"
            f"<p>The first {len(shown)} of {len(samples)} scored prompts (greedy decoding, both models).</p>"
            f"{answers_table}")


def data_html(report: dict) -> str:
    rows = [("source", report.get("source")), ("format", report.get("format")),
            ("input rows", report.get("input_rows")), ("kept", report.get("kept")),
            *[(f"dropped: {reason}", n) for reason, n in report.get("dropped", {}).items()],
            ("truncated", report.get("truncated")), ("train / eval rows",
                                                     f"{report.get('train_rows')} / {report.get('eval_rows')}"),
            *[(f"tokens {k}", v) for k, v in report.get("tokens", {}).items()],
            ("max_seq_length", report.get("max_seq_length")), ("long rows", report.get("long_rows"))]
    return "<h2>Data</h2>" + html_table(("", "value"), rows)


def read_benchmarks(paths: list[str | Path]) -> list[dict]:
    """Snakemake's benchmark TSVs: one row per stage (the last repeat), with the stage name."""
    rows = []
    for path in paths:
        with open(path, newline="") as fh:
            records = list(csv.DictReader(fh, delimiter="\t"))
        if records:
            rows.append({"stage": Path(path).stem, **records[-1]})
    return rows


def timings_html(benchmarks: list[dict], stage_metrics: dict[str, dict]) -> str:
    """Wall time, CPU time and peak RSS of each benchmarked stage (Snakemake's benchmark files), and each stage's
    own figures (its wall time and peak memory as the stage measured them)."""
    bench = [(b["stage"], b.get("h:m:s"), b.get("s"), b.get("cpu_time"), b.get("max_rss"), b.get("mean_load"))
             for b in benchmarks]
    own = [(stage, m.get("wall_time_s"), fmt(m.get("peak_memory"))) for stage, m in stage_metrics.items()]
    return ("<h2>Stage timings (Snakemake benchmarks)</h2>"
            + html_table(("stage", "h:m:s", "wall s", "CPU s", "max RSS MB", "mean load %"), bench)
            + "<h2>Stage metrics</h2>" + html_table(("stage", "wall time s", "peak memory"), own))


def config_html(config: dict) -> str:
    from hpc_finetune.tracking.mlflow_run import flatten

    return "<h2>Effective configuration</h2>" + html_table(("key", "value"), sorted(flatten(config).items()))


def page(title: str, body: str) -> str:
    """A self-contained HTML page (no outside resource: the report opens offline)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f0f0f0; }}
table.answers td {{ white-space: pre-wrap; max-width: 28em; font-family: ui-monospace, monospace; font-size: 0.85em; }}
img {{ max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
</body></html>
"""


def group_html(section: dict) -> str:
    """The groups part of the HTML report's evaluation (group_tables as HTML)."""
    from hpc_finetune.evaluate.report import RATES_TITLE, group_tables

    tables = group_tables(section)
    out = [f"<h2>Per group</h2><p>{html.escape(tables['title'])}</p>", html_table(*tables["metrics"], "metrics")]
    out += [f"<p>{html.escape(line)}</p>" for line in tables["small"]]
    if tables["rates"][1]:
        out += [f"<p>{html.escape(RATES_TITLE)}</p>", html_table(*tables["rates"], "metrics")]
    return "".join(out + [f"<p>{html.escape(line)}</p>" for line in tables["worst"]])
