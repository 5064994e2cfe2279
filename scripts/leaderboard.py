"""Leaderboard stage: the experiment's runs and base-only entries side by side, the best one by a metric.

    python scripts/leaderboard.py --entries '[{"name": "lr2e-4", "kind": "finetuned", "model": "demo",
        "dataset": "data/demo/medical_qa.jsonl", "settings": {"training.learning_rate": 2e-4},
        "run_dir": "results/lr2e-4", "base_metrics": null}, ...]' --metric token_f1 --direction max \
        --out-csv results/leaderboard/leaderboard.csv --out-md results/leaderboard/leaderboard.md \
        --figures-dir results/leaderboard

One row per entry (hpc_finetune.report.leaderboard: the columns, GPU-hours and energy): a fine-tuned run reads
its metrics/evaluate.json, metrics/train.json and metrics/resources.csv; a base entry its base.json (the
evaluate stage's base part). --metric is an evaluate metric key (answer_loss, token_f1, accuracy, ...,
lm_eval.<task>.<metric>); an unknown one is an error listing the known ones. Writes the CSV (every column), the
Markdown (the main table and every metric; a single run: its base-vs-fine-tuned table) and into --figures-dir
metric.png (the metric per run, each base marked) and eval_loss.png (the runs' eval-loss curves overlaid);
with --out-html, the report page (hpc_finetune.report.leaderboard.leaderboard_html, the figures embedded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.io.cli import cli, log, table
from hpc_finetune.io.files import write_text
from hpc_finetune.report import leaderboard, plots


@dataclass
class Config:
    entries: str = field(metadata={"help": "JSON list of entries (module docstring of hpc_finetune.report.leaderboard)"})
    metric: str = field(metadata={"help": "evaluate metric that ranks the entries (e.g. token_f1, accuracy)"})
    out_csv: str = field(metadata={"help": "leaderboard.csv"})
    out_md: str = field(metadata={"help": "leaderboard.md"})
    figures_dir: str = field(metadata={"help": "where metric.png and eval_loss.png go"})
    direction: str = field(default="max", metadata={"help": "max (higher is better) or min"})
    out_html: str | None = field(default=None, metadata={"help": "the leaderboard as a report page (HTML)"})


def main(cfg: Config) -> dict:
    board = leaderboard.build(leaderboard.parse_entries(cfg.entries), cfg.metric, cfg.direction)
    leaderboard.write_csv(board, cfg.out_csv)
    write_text(cfg.out_md, leaderboard.markdown(board))
    figures = Path(cfg.figures_dir)
    board["figures"] = {
        "metric": str(plots.leaderboard_metric(board["rows"], cfg.metric, leaderboard.value_of, board["best"],
                                               figures / "metric.png")),
        "eval_loss": str(plots.eval_loss_overlay(board["histories"], figures / "eval_loss.png")),
    }
    if cfg.out_html:
        from hpc_finetune.report.tables import page

        section = leaderboard.leaderboard_html(board, {k: Path(v) for k, v in board["figures"].items()})
        write_text(cfg.out_html, page("Leaderboard", section))
    rows = [(row["name"], f"{row['kind']}: {leaderboard.cell(leaderboard.value_of(row, cfg.metric))}")
            for row in board["rows"]]
    log.info("\n%s\n%s", table(rows, f"leaderboard by {cfg.metric} ({cfg.direction})"), leaderboard.best_line(board))
    return board


if __name__ == "__main__":
    cli(main, Config, __doc__)
