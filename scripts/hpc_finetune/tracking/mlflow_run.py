"""One MLflow run per fine-tuning run, written by two stages: train (the training settings as params, each logged
step's metrics live, the final train metrics, the adapter config, train.json and resources.csv) and the report
stage after evaluate (the rest of the effective config, the evaluate metrics, the metrics JSON and the plots).
The train stage records the run id in metrics/train.json; a run trained with tracking off gets its run from the
report stage, with the step metrics taken from the train log history.

Where: `tracking.tracking_uri`, else MLFLOW_TRACKING_URI, else an offline SQLite store {output_dir}/mlflow.db
(artifacts next to it in mlartifacts/). The workflow hands the URI to the jobs in MLFLOW_TRACKING_URI, never on a
command line, and no log shows more of it than `where()` (scheme and host, no user, password, path or query).
Tracking never fails a stage: an unreachable store is a warning.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hpc_finetune.io.cli import log

ENV_URI = "MLFLOW_TRACKING_URI"
# MLflow's own length limits (mlflow.utils.validation): longer values are cut, not refused
MAX_PARAM_VALUE, BATCH_PARAMS, BATCH_METRICS = 6000, 100, 1000
HISTORY_SKIP = ("step", "epoch", "total_flos")
FINGERPRINT_TAG = "hpc_finetune.fingerprint"  # the train stage's checkpoint fingerprint: which training a run is


def tracking_uri(cfg: dict, environ: dict) -> str:
    """tracking.tracking_uri, else MLFLOW_TRACKING_URI, else sqlite:///{output_dir, absolute}/mlflow.db."""
    if cfg["tracking"]["tracking_uri"]:
        return cfg["tracking"]["tracking_uri"]
    if environ.get(ENV_URI):
        return environ[ENV_URI]
    return f"sqlite:///{Path(cfg['output_dir']).resolve() / 'mlflow.db'}"


def tracking_environment(cfg: dict, environ: dict) -> dict[str, str]:
    """What the workflow adds to its environment (inherited by the jobs) when MLflow is on: the tracking URI."""
    return {ENV_URI: tracking_uri(cfg, environ)} if cfg["tracking"]["mlflow"] else {}


def where(uri: str) -> str:
    """The part of a tracking URI a log may show: `sqlite`, `file`, or scheme://host[:port]."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file", "sqlite"):
        return parts.scheme or "file"
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}"


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Nested config as MLflow params: {"training.learning_rate": "0.01", ...}; values cut to MLflow's limit."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): str(node)[:MAX_PARAM_VALUE]}


def numeric(values: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a flat metrics dict (booleans and None left out), keys prefixed."""
    return {prefix + k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """The MLflow run of one fine-tuning run, through MlflowClient (the fluent API prints the tracking URI)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, experiment: str, run_name: str, run_id: str | None = None, fingerprint: str | None = None,
             reuse: bool = False) -> Tracker | None:
        """Continue run `run_id` when the store has it; else, with `reuse`, the run of `experiment` tagged with
        this training `fingerprint`; else start a run named `run_name` in `experiment` (created on first use),
        tagged with the fingerprint. None, with a warning, when the store cannot be reached."""
        uri = os.environ.get(ENV_URI) or "mlruns"
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            if run_id:
                try:
                    client.update_run(run_id, status="RUNNING")
                    log.info("MLflow (%s): continuing run %s", where(uri), run_id)
                    return cls(client, run_id)
                except MlflowException:
                    log.info("MLflow (%s): run %s is not in this store; starting a new one", where(uri), run_id)
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(
                experiment, artifact_location=artifact_location(uri, experiment))
            if reuse and fingerprint:
                tagged = client.search_runs([experiment_id], f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}'",
                                            max_results=1)
                if tagged:
                    log.info("MLflow (%s): continuing run %s of this training", where(uri), tagged[0].info.run_id)
                    return cls(client, tagged[0].info.run_id)
            tags = {FINGERPRINT_TAG: fingerprint} if fingerprint else None
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
            log.info("MLflow (%s): experiment %s, run %s (%s)", where(uri), experiment, run_name, run.info.run_id)
            return cls(client, run.info.run_id)
        except Exception as err:  # tracking is a side channel: never fail the stage for it
            log.warning("MLflow (%s): not recording this run: %s", where(uri), type(err).__name__)
            return None

    def _safely(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as err:
            log.warning("MLflow: could not log %s (%s: %s)", what, type(err).__name__, str(err)[:200])

    def set_tags(self, tags: dict) -> None:
        """Tags of the run (an experiment's run: its name and sweep values, so MLflow's compare view groups them)."""
        for key, value in tags.items():
            self._safely(f"tag {key}", self.client.set_tag, self.run_id, key, str(value)[:5000])

    def log_params(self, params: dict[str, str]) -> None:
        """Params not yet in the run (MLflow refuses to change a logged param)."""
        from mlflow.entities import Param

        def log() -> None:
            have = self.client.get_run(self.run_id).data.params
            new = [Param(k, v) for k, v in params.items() if k not in have]
            for i in range(0, len(new), BATCH_PARAMS):
                self.client.log_batch(self.run_id, params=new[i:i + BATCH_PARAMS])

        self._safely("params", log)

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self._safely("metrics", self._batches, metrics)

    def log_history(self, history: list[dict]) -> None:
        """The trainer's log history as per-step metrics, each step a metric does not have yet (a resumed run, a
        run trained with tracking off, or steps logged before a restart)."""
        from mlflow.entities import Metric

        def log() -> None:
            now = int(time.time() * 1000)
            have: dict[str, set] = {}
            metrics = []
            for entry in history:
                for key, value in numeric({k: v for k, v in entry.items() if k not in HISTORY_SKIP}).items():
                    if key not in have:
                        have[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
                    if entry.get("step", 0) not in have[key]:
                        metrics.append(Metric(key, value, now, int(entry.get("step", 0))))
            self._batches(metrics)

        self._safely("the step metrics", log)

    def _batches(self, metrics: list) -> None:
        for i in range(0, len(metrics), BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH_METRICS])

    def log_artifacts(self, paths: list[str | Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if Path(path).is_file():
                self._safely(f"artifact {Path(path).name}", self.client.log_artifact, self.run_id, str(path),
                             artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self._safely("the run's end", self.client.set_terminated, self.run_id, status)

    def callback(self):
        """A TrainerCallback that logs each logged step's numbers (rank 0 only) as they come."""
        from transformers import TrainerCallback

        tracker = self

        class MlflowSteps(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if state.is_world_process_zero and logs:
                    tracker.log_metrics(numeric({k: v for k, v in logs.items() if k not in HISTORY_SKIP}),
                                        step=state.global_step)

        return MlflowSteps()


def artifact_location(uri: str, experiment: str) -> str | None:
    """For a SQLite store: mlartifacts/<experiment> next to the database (MLflow's default is ./mlruns in
    whatever directory the job runs in). Elsewhere the server decides."""
    parts = urlsplit(uri)
    if parts.scheme != "sqlite":
        return None
    database = Path(uri.split(":///", 1)[1]) if ":///" in uri else Path("mlflow.db")
    return (database.resolve().parent / "mlartifacts" / experiment).as_uri()
