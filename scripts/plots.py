"""Plots stage: the figures and tables of `snakemake --report` for a finished run, and the run's MLflow record.

    python scripts/plots.py --run-dir results/demo --config-json "$(cat effective.json)" \
        --out-dir results/demo/report --evaluate true --mlflow false

Reads the run's outputs (metrics/train.json, metrics/resources.csv, data/report.json, metrics/evaluate.json and
eval/samples.jsonl, metrics/merge.json, benchmarks/*.tsv) and writes into --out-dir: curves.png (train and eval
loss, learning rate, gradient norm, tokens/s), resources.png (memory, utilisation, power, temperature over time),
tokens.png (token lengths), timings.png (wall time and peak RSS per stage), evaluation.html (base vs fine-tuned,
answers side by side), config.html (the effective configuration) and overview.html (all of it on one page).
With --mlflow true: the rest of the effective config, the evaluate metrics and these files go into the run's
MLflow run (the one metrics/train.json names, else a new one that also gets the train metrics).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.io.cli import StageError, cli, log, table
from hpc_finetune.io.files import read_json, read_jsonl
from hpc_finetune.io.schema import option
from hpc_finetune.report.overview import build, log_to_mlflow


@dataclass
class Config:
    run_dir: str = field(metadata={"help": "the run's directory ({output_dir}/{run_name})"})
    config_json: str = field(metadata={"help": "the effective configuration as JSON"})
    out_dir: str = field(metadata={"help": "where the figures and pages go"})
    data_report: str = field(default="", metadata={
        "help": "the data report, when not {run_dir}/data/report.json (an experiment's runs share prepared data)"})
    evaluate: bool = option("evaluate.enabled")
    mlflow: bool = option("tracking.mlflow")
    mlflow_experiment: str = option("tracking.experiment")


def main(cfg: Config) -> dict:
    try:
        effective = json.loads(cfg.config_json)
    except json.JSONDecodeError as err:
        raise StageError(f"--config-json is not valid JSON: {err}") from None
    run = Path(cfg.run_dir)
    inputs = {
        "train": read_json(run / "metrics" / "train.json", "train metrics"),
        "data": read_json(Path(cfg.data_report) if cfg.data_report else run / "data" / "report.json", "data report"),
        "evaluate": read_json(run / "metrics" / "evaluate.json", "evaluate metrics") if cfg.evaluate else None,
        "samples": read_jsonl(run / "eval" / "samples.jsonl") if cfg.evaluate else [],
        "merge": read_json(p, "merge report") if (p := run / "metrics" / "merge.json").is_file() else None,
    }
    files = build(run, effective, inputs, Path(cfg.out_dir))
    if cfg.mlflow:
        log_to_mlflow(cfg.mlflow_experiment, effective, inputs, run, files)
    rows = [(name, str(path)) for name, path in files.items()]
    log.info("\n%s", table(rows, "Report files (snakemake --report gathers them)"))
    return {k: str(v) for k, v in files.items()}


if __name__ == "__main__":
    cli(main, Config, __doc__)
