"""The experiment's leaderboard: one row per fine-tuned run and per base-only entry, the best one by a chosen
metric, as CSV, Markdown and an HTML section of the report (scripts/leaderboard.py writes them; the figures are in
hpc_finetune.report.plots).

An entry (the workflow builds the list) is {"name", "kind": "finetuned"|"base", "model", "dataset", "settings":
{dotted key: value, the keys that vary}, "run_dir": "results/<run>" (finetuned: its metrics/evaluate.json,
metrics/train.json and metrics/resources.csv are read) or null, "base_metrics": the base part's base.json (base
entries)}.

A row: model, dataset, the varying settings, train/eval loss (the last logged), every evaluate metric of the base
and the fine-tuned model with the difference (fine-tuned minus base), the convergence verdict, the train wall time,
tokens/s, peak memory, GPU-hours (train seconds x GPUs sampled / 3600) and energy (the NVML power samples of
resources.csv integrated over time, trapezoids per GPU, in kWh); both "n/a" without a GPU. The worst group when the
evaluation has group metrics. A metric's value of a row is the fine-tuned model's for a run, the base model's for
a base entry; the best row is the one with the highest (direction max) or lowest (min) value.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import read_json
from hpc_finetune.report.tables import fmt as cell  # "n/a" for None, 4 significant digits

KINDS = ("finetuned", "base")
DIRECTIONS = ("max", "min")
ENTRY_KEYS = {"name": str, "kind": str, "model": str, "dataset": str, "settings": dict}
COST = ("train_loss", "eval_loss", "convergence", "train_wall_s", "tokens_per_s", "peak_memory_mb", "gpu_hours",
        "energy_kwh", "worst_group")
JOULES_PER_KWH = 3.6e6


def parse_entries(text: str) -> list[dict]:
    """The --entries JSON: a non-empty list of entries, each checked (a StageError naming the entry and key)."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise StageError(f"--entries is not valid JSON: {err}") from None
    if not isinstance(entries, list) or not entries:
        raise StageError("--entries must be a non-empty JSON list of entries ({name, kind, model, dataset, settings, "
                         "run_dir, base_metrics})")
    names = set()
    for number, entry in enumerate(entries, start=1):
        where = f"--entries entry {number}" + (f" ({entry.get('name')})" if isinstance(entry, dict) else "")
        if not isinstance(entry, dict):
            raise StageError(f"{where}: expected an object, got {type(entry).__name__}")
        for key, kind in ENTRY_KEYS.items():
            if not isinstance(entry.get(key), kind):
                raise StageError(f"{where}: {key} must be a {kind.__name__}, got {entry.get(key)!r}")
        if entry["kind"] not in KINDS:
            raise StageError(f"{where}: kind {entry['kind']!r} is not one of {', '.join(KINDS)}")
        need = "run_dir" if entry["kind"] == "finetuned" else "base_metrics"
        if not isinstance(entry.get(need), str) or not entry[need]:
            raise StageError(f"{where}: a {entry['kind']} entry needs {need} (a path), got {entry.get(need)!r}")
        if entry["name"] in names:
            raise StageError(f"{where}: the name {entry['name']!r} is used twice")
        names.add(entry["name"])
    return entries


def energy_and_gpu_hours(resources: list[dict], train_seconds: float | None) -> tuple[float | None, float | None]:
    """(kWh, GPU-hours) from resources.csv rows: each GPU's power samples integrated over elapsed_s (trapezoids),
    summed over GPUs; GPU-hours = train seconds x GPUs / 3600. (None, None) without GPU rows."""
    per_gpu: dict[str, list[tuple[float, float]]] = {}
    for row in resources:
        if row.get("device", "cpu") != "cpu" and row.get("power_w") not in (None, ""):
            per_gpu.setdefault(row["device"], []).append((float(row["elapsed_s"]), float(row["power_w"])))
    gpus = {r["device"] for r in resources if r.get("device", "cpu") != "cpu"}
    if not gpus:
        return None, None
    joules = 0.0
    for points in per_gpu.values():
        points.sort()
        joules += sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(points, points[1:], strict=False))
    hours = train_seconds * len(gpus) / 3600 if train_seconds is not None else None
    return (joules / JOULES_PER_KWH if per_gpu else None), hours


def read_entry(entry: dict) -> dict:
    """The files of an entry: {"evaluate", "train" (None for a base entry), "resources"}."""
    where = f"entry {entry['name']}"
    if entry["kind"] == "base":
        return {"evaluate": read_json(entry["base_metrics"], f"{where}: base metrics"), "train": None, "resources": []}
    run = Path(entry["run_dir"])
    if not run.is_dir():
        raise StageError(f"{where}: run_dir {run} does not exist; run its stages first (or drop the entry)")
    resources = run / "metrics" / "resources.csv"
    if not resources.is_file():
        raise StageError(f"{where}: {resources} is missing; the train stage writes it: re-run the train stage")
    with open(resources, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {"evaluate": read_json(run / "metrics" / "evaluate.json", f"{where}: evaluate metrics"),
            "train": read_json(run / "metrics" / "train.json", f"{where}: train metrics"), "resources": rows}


def metric_values(evaluate: dict) -> dict[str, dict]:
    """{metric: {base, finetuned, rows}} of an evaluate.json or base.json: its side-by-side metrics and each
    lm-eval task's (`lm_eval.<task>.<metric>`)."""
    found = {k: v for k, v in (evaluate.get("metrics") or {}).items()}
    for task, values in ((evaluate.get("lm_eval") or {}).get("results") or {}).items():
        found |= {f"lm_eval.{task}.{name}": v for name, v in values.items()}
    return found


def diff(base, tuned):
    return round(tuned - base, 6) if isinstance(base, int | float) and isinstance(tuned, int | float) else None


def worst_group(evaluate: dict, side: str) -> str | None:
    found = ((evaluate.get("groups") or {}).get("worst") or {}).get(side)
    return f"{found['group']} ({found['metric']} {found['value']:.4g})" if found else None


def row_of(entry: dict, files: dict) -> dict:
    """The entry's leaderboard row (module docstring)."""
    evaluate, train = files["evaluate"], files["train"]
    tuned = entry["kind"] == "finetuned"
    row = {"name": entry["name"], "kind": entry["kind"], "model": entry["model"], "dataset": entry["dataset"]}
    row |= {f"setting {key}": value for key, value in entry["settings"].items()}
    for name, values in metric_values(evaluate).items():
        row[f"{name} base"] = values.get("base")
        row[f"{name} finetuned"] = values.get("finetuned") if tuned else None
        row[f"{name} diff"] = diff(values.get("base"), values.get("finetuned")) if tuned else None
    train = train or {}
    peak = train.get("peak_memory") or {}
    kwh, gpu_hours = energy_and_gpu_hours(files["resources"], train.get("train_seconds"))
    row |= {"train_loss": train.get("train_loss_last"), "eval_loss": train.get("eval_loss_last"),
            "convergence": (train.get("convergence") or {}).get("verdict"), "train_wall_s": train.get("wall_time_s"),
            "tokens_per_s": train.get("tokens_per_second"),
            "peak_memory_mb": peak.get("peak_gpu_mb", peak.get("peak_rss_mb")) if peak else None,
            "gpu_hours": gpu_hours, "energy_kwh": kwh,
            "worst_group": worst_group(evaluate, "finetuned" if tuned else "base")}
    return row


def value_of(row: dict, metric: str):
    """The row's value of `metric`: the fine-tuned model's for a run, the base model's for a base entry."""
    return row.get(f"{metric} {'finetuned' if row['kind'] == 'finetuned' else 'base'}")


def build(entries: list[dict], metric: str, direction: str) -> dict:
    """{"rows", "columns", "metric", "direction", "best", "metrics"}: the rows of every entry, the best row's name
    (None when no row has the metric), and the metrics that can be chosen."""
    if direction not in DIRECTIONS:
        raise StageError(f"--direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    read = [(entry, read_entry(entry)) for entry in entries]
    rows = [row_of(entry, files) for entry, files in read]
    known = list(dict.fromkeys(name for _, files in read for name in metric_values(files["evaluate"])))
    if metric not in known:
        raise StageError(f"--metric {metric!r} is not an evaluate metric of these entries; known: {', '.join(known)}")
    scored = [row for row in rows if isinstance(value_of(row, metric), int | float)]
    pick = max if direction == "max" else min
    best = pick(scored, key=lambda row: value_of(row, metric))["name"] if scored else None
    columns = list(dict.fromkeys(key for row in rows for key in row if key not in COST)) + list(COST)
    return {"rows": rows, "columns": columns, "metric": metric, "direction": direction, "best": best,
            "metrics": known, "histories": {entry["name"]: (files["train"] or {}).get("log_history", [])
                                            for entry, files in read if entry["kind"] == "finetuned"}}


def write_csv(board: dict, path: str | Path) -> None:
    """Every column of every row, values as measured (full precision); missing ones are "n/a"."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(board["columns"])
        writer.writerows([["n/a" if row.get(c) is None else row[c] for c in board["columns"]] for row in board["rows"]])


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    escape = lambda v: cell(v).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(escape, row)) + " |" for row in rows)]


def summary_table(board: dict) -> tuple[list[str], list[list]]:
    """The leaderboard's main table: one row per entry, the chosen metric (base, fine-tuned, difference) and the
    cost columns."""
    metric = board["metric"]
    settings = [c for c in board["columns"] if c.startswith("setting ")]
    header = ["", "name", "kind", "model", "dataset", *settings, f"{metric} base", f"{metric} fine-tuned",
              f"{metric} diff", *COST]
    rows = [["best" if row["name"] == board["best"] else "", row["name"], row["kind"], row["model"], row["dataset"],
             *(row.get(s) for s in settings), row.get(f"{metric} base"), row.get(f"{metric} finetuned"),
             row.get(f"{metric} diff"), *(row.get(c) for c in COST)] for row in board["rows"]]
    return header, rows


def metrics_table(board: dict) -> tuple[list[str], list[list]]:
    """Every evaluate metric per entry: 'base -> fine-tuned (difference)', or the base value for a base entry."""
    def show(row, metric):
        base, tuned, change = (row.get(f"{metric} {k}") for k in ("base", "finetuned", "diff"))
        if row["kind"] == "base" or tuned is None:
            return cell(base)
        return f"{cell(base)} -> {cell(tuned)} ({'+' if (change or 0) >= 0 else ''}{cell(change)})"
    return ["name", *board["metrics"]], [[row["name"], *(show(row, m) for m in board["metrics"])]
                                        for row in board["rows"]]


def best_line(board: dict) -> str:
    if board["best"] is None:
        return f"Best: none (no entry has {board['metric']})"
    row = next(r for r in board["rows"] if r["name"] == board["best"])
    return (f"Best by {board['metric']} ({'highest' if board['direction'] == 'max' else 'lowest'}): {board['best']} "
            f"({row['kind']}, {cell(value_of(row, board['metric']))})")


def single_run(board: dict) -> bool:
    return len(board["rows"]) == 1 and board["rows"][0]["kind"] == "finetuned"


def markdown(board: dict) -> str:
    """leaderboard.md; with a single run, that run's base-vs-fine-tuned table and its cost."""
    if single_run(board):
        row = board["rows"][0]
        out = [f"# {row['name']}: base vs fine-tuned ({row['model']}, {row['dataset']})", ""]
        out += markdown_table(["metric", "base", "fine-tuned", "difference"],
                              [[m, row.get(f"{m} base"), row.get(f"{m} finetuned"), row.get(f"{m} diff")]
                               for m in board["metrics"]])
        out += ["", *markdown_table(["", "value"], [[c, row.get(c)] for c in COST])]
        return "\n".join(out) + "\n"
    out = ["# Leaderboard", "", best_line(board), "", *markdown_table(*summary_table(board)), "",
           "## Every evaluate metric (base -> fine-tuned (difference))", "", *markdown_table(*metrics_table(board))]
    return "\n".join(out) + "\n"


def leaderboard_html(board: dict, figures: dict[str, Path] | None = None) -> str:
    """The leaderboard as an HTML section of the report (the experiment's first page when there are several runs):
    the best entry, the main table, every metric, and the figures embedded."""
    import html

    from hpc_finetune.report.overview import embedded
    from hpc_finetune.report.tables import html_table

    parts = [f"<h2>Leaderboard</h2><p>{html.escape(best_line(board))}</p>",
             html_table(*summary_table(board), "metrics"),
             "<h2>Every evaluate metric</h2><p>base -> fine-tuned (difference); a base entry: its value.</p>",
             html_table(*metrics_table(board), "metrics")]
    parts += [embedded(path) for path in (figures or {}).values()]
    return "".join(parts)
