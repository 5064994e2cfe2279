"""What the train stage records besides the adapter, on rank 0: resource usage over time (resources.py) and the
MLflow run (hpc_finetune.tracking.mlflow_run). Neither is part of the fingerprint: sampling and tracking settings
change nothing that is trained, so turning them on resumes a run instead of starting it over."""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hpc_finetune.io.cli import log
from hpc_finetune.tracking.mlflow_run import Tracker, flatten, numeric
from hpc_finetune.train.resources import ResourceSampler

# Config fields that say how the run is watched, not what is trained.
OBSERVE_FIELDS = ("resources_out", "resource_interval_s", "mlflow", "mlflow_experiment", "run_name", "mlflow_tags")
RUN_ID_FILE = "mlflow_run_id"  # in the checkpoint directory: a resumed run continues its MLflow run


class NoSampler(contextlib.nullcontext):
    def summary(self) -> dict:
        return {}


class Watch:
    """What rank 0 records of a training run: `callbacks()` for the trainer (MLflow steps),
    `resources(step)` around training (the sampler; a no-op elsewhere or without --resources-out), `metrics()`
    for train.json, and `finish(metrics)` once train.json is written."""

    def __init__(self, cfg: Any, rank: int, run_dir: Path, settings: dict):
        self.cfg, self.rank = cfg, rank
        self.sampler: ResourceSampler | NoSampler = NoSampler()
        self.tracker = start_tracking(cfg, rank, run_dir, settings)

    def callbacks(self) -> list:
        return [self.tracker.callback()] if self.tracker else []

    def resources(self, step) -> ResourceSampler | NoSampler:
        if self.rank == 0 and self.cfg.resources_out:
            self.sampler = ResourceSampler(self.cfg.resources_out, self.cfg.resource_interval_s, step)
        return self.sampler

    def metrics(self) -> dict:
        return {"resources": self.sampler.summary(), "mlflow_run_id": self.tracker.run_id if self.tracker else None}

    def finish(self, metrics: dict) -> None:
        finish_tracking(self.tracker, self.cfg, metrics)


def start_tracking(cfg: Any, rank: int, run_dir: Path, settings: dict) -> Tracker | None:
    """Rank 0 with tracking on: the MLflow run (the one this checkpoint directory started, when resuming) with
    the training settings as params `training.<key>`."""
    if not cfg.mlflow or rank != 0:
        return None
    id_file = run_dir / RUN_ID_FILE
    tracker = Tracker.open(cfg.mlflow_experiment, cfg.run_name,
                           run_id=id_file.read_text().strip() if id_file.is_file() else None,
                           fingerprint=run_dir.name)
    if tracker:
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(tracker.run_id)
        tracker.log_params(flatten({"training": settings}))
        tracker.set_tags(getattr(cfg, "mlflow_tags", None) or {})
    return tracker


def finish_tracking(tracker: Tracker | None, cfg: Any, metrics: dict) -> None:
    """The final train metrics (`train.<key>`), steps the live callback did not see, and the artifacts."""
    if tracker is None:
        return
    tracker.log_history(metrics.get("log_history", []))
    tracker.log_metrics(numeric(metrics, "train."))
    for device, values in metrics.get("resources", {}).items():
        tracker.log_metrics(numeric(values, f"resources.{device}."))
    tracker.log_artifacts([Path(cfg.output_dir) / "adapter_config.json"], "adapter")
    tracker.log_artifacts([cfg.metrics_out, cfg.resources_out], "metrics")
    tracker.finish()
    log.info("MLflow: run %s recorded", tracker.run_id)


def training_settings(cfg: Any, path_fields: tuple) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in path_fields and k not in OBSERVE_FIELDS}
