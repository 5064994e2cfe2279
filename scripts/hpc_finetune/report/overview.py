"""The plots stage's work: every figure and page of the report from a run's outputs, and the same into MLflow."""

from __future__ import annotations

import base64
import copy
from pathlib import Path

from hpc_finetune.report import plots, tables
from hpc_finetune.summary.manifest import redact
from hpc_finetune.tracking.mlflow_run import Tracker, flatten, numeric, where
from hpc_finetune.train.resources import read_resources

BENCHMARKED = ("fetch_dataset", "train", "merge", "evaluate")


def public_config(config: dict) -> dict[str, str]:
    """The effective config flattened (`section.key`) with secrets redacted and the tracking URI cut to what a
    log may show."""
    config = copy.deepcopy(config)
    if (config.get("tracking") or {}).get("tracking_uri"):
        config["tracking"]["tracking_uri"] = where(config["tracking"]["tracking_uri"])
    return redact(flatten(config))


def embedded(path: Path) -> str:
    return f'<img alt="{path.stem}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def build(run: Path, config: dict, inputs: dict, out: Path) -> dict[str, Path]:
    """Write the figures and pages into `out`; return them by name."""
    train = inputs["train"]
    history = train.get("log_history", [])
    files = {"curves": plots.training_curves(history, out / "curves.png")}
    resources = run / "metrics" / "resources.csv"
    rows = read_resources(resources) if resources.is_file() else []
    files["resources"] = plots.resources_plot(rows, out / "resources.png")
    files["tokens"] = plots.token_histogram(inputs["data"], out / "tokens.png")
    benchmarks = tables.read_benchmarks([p for name in BENCHMARKED if (p := run / "benchmarks" / f"{name}.tsv").is_file()])
    files["timings"] = plots.timings_plot(benchmarks, out / "timings.png")
    stage_metrics = {name: m for name, m in (("train", train), ("merge", inputs.get("merge")),
                                             ("evaluate", inputs.get("evaluate"))) if m}
    evaluation = (tables.evaluation_html(inputs["evaluate"], inputs["samples"]) if inputs.get("evaluate")
                  else "<p>Evaluation is off (evaluate.enabled: false).</p>")
    config_part = "<h2>Effective configuration</h2>" + tables.html_table(
        ("key", "value"), sorted(public_config(config).items()))
    title = f"Fine-tuning run {config.get('run_name', run.name)}"
    summary = tables.html_table(("", "value"), [
        ("model", (config.get("model") or {}).get("model_id") or (config.get("model") or {}).get("source")),
        ("train loss first -> last", f"{tables.fmt(train.get('train_loss_first'))} -> "
                                      f"{tables.fmt(train.get('train_loss_last'))}"),
        ("eval loss first -> last", f"{tables.fmt(train.get('eval_loss_first'))} -> "
                                     f"{tables.fmt(train.get('eval_loss_last'))}"),
        ("steps / tokens", f"{train.get('steps')} / {train.get('tokens')}"),
        ("device", f"{train.get('device')}, {train.get('quantization')}, world size {train.get('world_size')}"),
        ("MLflow run", train.get("mlflow_run_id") or "not tracked"),
    ])
    resource_summary = tables.html_table(("device", "peak / mean"), [
        (device, ", ".join(f"{k} {v}" for k, v in values.items())) for device, values in
        (train.get("resources") or {}).items()])
    files["evaluation"] = _page(out / "evaluation.html", f"{title}: evaluation", evaluation)
    files["config"] = _page(out / "config.html", f"{title}: configuration", config_part)
    files["overview"] = _page(out / "overview.html", title, "".join([
        "<h2>Summary</h2>", summary, evaluation,
        "<h2>Training curves</h2>", embedded(files["curves"]),
        "<h2>Resource use over time</h2>", embedded(files["resources"]), resource_summary,
        tables.data_html(inputs["data"]), embedded(files["tokens"]),
        tables.timings_html(benchmarks, stage_metrics), embedded(files["timings"]),
        config_part,
    ]))
    return files


def _page(path: Path, title: str, body: str) -> Path:
    path.write_text(tables.page(title, body))
    return path


def log_to_mlflow(experiment: str, config: dict, inputs: dict, run: Path, files: dict[str, Path]) -> str | None:
    """The evaluate part of the run's MLflow record: the run metrics/train.json names (or a new one, which then
    also gets the train stage's part from train.json), the effective config as params, the evaluate metrics
    (`evaluate.<key>`), the metrics JSON and the report files as artifacts."""
    train = inputs["train"]
    tracker = Tracker.open(experiment, config.get("run_name", run.name), run_id=train.get("mlflow_run_id"),
                           fingerprint=train.get("fingerprint"), reuse=True)
    if tracker is None:
        return None
    tracker.log_params(public_config(config))
    if tracker.run_id != train.get("mlflow_run_id"):  # trained with tracking off: the train part too
        tracker.log_history(train.get("log_history", []))
        tracker.log_metrics(numeric(train, "train."))
        tracker.log_artifacts([run / "adapters" / "adapter_config.json"], "adapter")
    if inputs.get("evaluate"):
        tracker.log_metrics(numeric(inputs["evaluate"], "evaluate."))
    tracker.log_artifacts([run / "metrics" / f"{name}.json" for name in ("train", "evaluate", "merge")]
                          + [run / "metrics" / "resources.csv", run / "data" / "report.json"], "metrics")
    tracker.log_artifacts(list(files.values()), "report")
    tracker.finish()
    return tracker.run_id
