"""Resource sampling, MLflow tracking and the report's tables, with the real parts: a sampler thread reading this
process, a real train run of the tiny model recorded into a SQLite MLflow store and read back with MlflowClient.
The report built from the demo run and opened in Chromium: tests/e2e/test_report_workflow.py."""

from __future__ import annotations

import csv
import json
import logging
import time

import pytest
import train
from hpc_finetune.data.clean import length_histogram
from hpc_finetune.io.files import read_jsonl
from hpc_finetune.report.tables import evaluation_html
from hpc_finetune.tracking.mlflow_run import flatten, tracking_uri, where
from hpc_finetune.train.resources import COLUMNS, ResourceSampler, read_resources, summarize
from support.common import DEMO_DATA
from support.train_stage import STEPS, make_config


def busy(cpu_seconds: float) -> int:
    """Work until this process has used `cpu_seconds` more CPU time: the same work on a fast or a loaded machine
    (a wall-clock loop gets less CPU the busier the machine)."""
    end, n = time.process_time() + cpu_seconds, 0
    while time.process_time() < end:
        n += sum(i * i for i in range(1000))
    return n


def test_the_sampler_records_the_process_over_time(tmp_path):
    """Driven by CPU time used, not by wall time: the verdicts hold on a loaded machine (the CPU-time match is
    exact up to what runs between the first sample and the block, and after the last one)."""
    path = tmp_path / "resources.csv"
    steps = iter(range(100000))
    with ResourceSampler(path, 0.1, step=lambda: next(steps)) as sampler:
        cpu_before = time.process_time()
        ballast = bytearray(64 << 20)  # 64 MiB more resident memory while it runs
        ballast[::4096] = b"x" * len(ballast[::4096])
        busy(0.8)
        used = time.process_time() - cpu_before
    rows = read_resources(path)
    cpu = [r for r in rows if r["device"] == "cpu"]
    assert list(rows[0]) == list(COLUMNS) and len(cpu) >= 4  # start, every 0.1 s, end
    times = [float(r["elapsed_s"]) for r in cpu]
    assert times == sorted(times) and times[-1] >= 0.75  # at least the busy thread's CPU time
    assert [int(r["step"]) for r in cpu] == sorted(int(r["step"]) for r in cpu)
    # each CPU percent covers the time since the sample before: together they add up to the CPU time used
    sampled = sum(float(r["utilization_pct"]) / 100 * (t - t0) for r, t, t0 in
                  zip(cpu[1:], times[1:], times[:-1], strict=True))
    assert used >= 0.8 and sampled == pytest.approx(used, abs=0.02), (sampled, used)
    summary = sampler.summary()
    assert summary == summarize(rows)
    assert summary["cpu"]["memory_mib_peak"] >= summary["cpu"]["memory_mib_mean"] > 64
    assert summary["cpu"]["samples"] == len(cpu) and "power_w_peak" not in summary["cpu"]
    del ballast


def test_token_length_histogram():
    hist = length_histogram([5, 6, 6, 7, 50, 50], bins=5)
    assert hist["edges"][0] == 5 and hist["edges"][-1] > 50 and sum(hist["counts"]) == 6
    assert len(hist["edges"]) == len(hist["counts"]) + 1 and hist["counts"][0] == 4 and hist["counts"][-1] == 2
    assert length_histogram([3] * 4) == {"edges": [3, 4], "counts": [4]}
    assert length_histogram([]) == {"edges": [], "counts": []}


def test_the_evaluation_table_shows_both_models_and_their_answers():
    """The evaluate stage's shape: side-by-side metrics (comparison_rows) and samples with both answers."""
    metrics = {"metrics": {"answer_loss": {"base": 3.5, "finetuned": 0.25, "rows": 27},
                           "exact_match": {"base": 0.0, "finetuned": 0.75, "rows": 8}}}
    samples = [{"index": 0, "split": "eval", "question": "Q <b>1</b>", "prompt": "<|x|>Q", "reference": "R",
                "base_answer": "B", "finetuned_answer": "F", "base_f1": 0.1, "finetuned_f1": 0.9}]
    page = evaluation_html(metrics, samples)
    assert "<th>fine-tuned</th>" in page and "<td>0</td><td>0.75</td><td>8</td><td>fine-tuned</td>" in page
    assert "Q &lt;b&gt;1&lt;/b&gt;" in page  # escaped
    header = page.split('class="answers"')[1].split("</thead>")[0]
    assert header.index("question") < header.index("reference") < header.index("base_answer") \
        < header.index("finetuned_answer") < header.index("base_f1")
    assert "<th>prompt</th>" not in header


def test_the_tracking_uri_and_what_a_log_may_show(tmp_path):
    cfg = {"output_dir": str(tmp_path), "tracking": {"mlflow": True, "tracking_uri": None}}
    assert tracking_uri(cfg, {}) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking_uri(cfg, {"MLFLOW_TRACKING_URI": "http://h:5000"}) == "http://h:5000"
    cfg["tracking"]["tracking_uri"] = "https://u:secret@mlflow.example.org:8443/x?token=t"
    assert tracking_uri(cfg, {"MLFLOW_TRACKING_URI": "http://h:5000"}) == cfg["tracking"]["tracking_uri"]
    assert where(cfg["tracking"]["tracking_uri"]) == "https://mlflow.example.org:8443"
    assert where(f"sqlite:///{tmp_path}/mlflow.db") == "sqlite"
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}


@pytest.fixture(scope="module")
def tracked(tiny_model, tmp_path_factory):
    """One real train run of the tiny model (8 steps, logging every step) with resource sampling and MLflow on,
    into a SQLite store; (metrics, config, store URI, log lines)."""
    out = tmp_path_factory.mktemp("tracked")
    rows = read_jsonl(DEMO_DATA)[:40]
    cfg = make_config(tiny_model, out, rows[:32], rows[32:], resources_out=str(out / "metrics" / "resources.csv"),
                      resource_interval_s=0.5, mlflow=True, mlflow_experiment="test-exp", run_name="tracked-run")
    uri = f"sqlite:///{out}/mlflow.db"
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        try:
            metrics = train.main(cfg)
        finally:
            logging.getLogger().removeHandler(handler)
    return metrics, cfg, uri, lines


def test_the_train_stage_samples_resources(tracked):
    metrics, cfg, _, _ = tracked
    with open(cfg.resources_out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    cpu = [r for r in rows if r["device"] == "cpu"]
    assert len(cpu) >= 2 and int(cpu[-1]["step"]) == STEPS and float(cpu[0]["memory_mib"]) > 100
    saved = json.loads(open(cfg.metrics_out).read())
    assert saved["resources"] == metrics["resources"] == summarize(rows)
    assert saved["resources"]["cpu"]["memory_mib_peak"] >= saved["resources"]["cpu"]["memory_mib_mean"]


def test_the_train_stage_records_an_mlflow_run(tracked):
    from mlflow.tracking import MlflowClient

    metrics, cfg, uri, lines = tracked
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.run_name == "tracked-run" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "test-exp"
    params = run.data.params
    assert params["training.learning_rate"] == str(cfg.learning_rate) and params["training.max_steps"] == str(STEPS)
    assert not any(k.startswith("training.mlflow") or k == "training.resources_out" for k in params)
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == list(range(1, STEPS + 1))  # logging_steps=1, each step once
    assert [m.value for m in loss] == pytest.approx([e["loss"] for e in metrics["log_history"] if "loss" in e])
    assert client.get_metric_history(run.info.run_id, "eval_loss")
    assert run.data.metrics["train.steps"] == STEPS
    assert run.data.metrics["train.train_loss_last"] == pytest.approx(metrics["train_loss_last"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} | \
        {a.path for a in client.list_artifacts(run.info.run_id, "metrics")}
    assert {"adapter/adapter_config.json", "metrics/train.json", "metrics/resources.csv"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "adapter/adapter_config.json", str(cfg.output_dir) + "-dl")
    assert json.loads(open(local).read())["r"] == cfg.lora_r
    assert not any(uri in line or str(cfg.output_dir).rsplit("/", 1)[0] + "/mlflow.db" in line for line in lines)


def test_tracking_settings_stay_out_of_the_fingerprint(tracked):
    """Turning MLflow or sampling on must resume a finished run, not train it again."""
    _, cfg, uri, _ = tracked
    from dataclasses import replace

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        again = train.main(replace(cfg, mlflow=False, resources_out="", resource_interval_s=9.0))
    assert again["train_seconds"] == 0 and again["mlflow_run_id"] is None and again["resources"] == {}


def test_the_report_stage_finds_the_run_of_the_same_training(tracked, tmp_path):
    """A train.json without a run id (tracking was off, or another store) still lands in the run of the same
    training (tagged with its fingerprint), however often the report stage runs: no second run, no step twice."""
    from hpc_finetune.report.overview import log_to_mlflow
    from mlflow.tracking import MlflowClient

    metrics, cfg, uri, _ = tracked
    run_dir = tmp_path / "run"
    (run_dir / "metrics").mkdir(parents=True)
    train_json = {**json.loads(open(cfg.metrics_out).read()), "mlflow_run_id": None}
    (run_dir / "metrics" / "train.json").write_text(json.dumps(train_json))
    inputs = {"train": train_json, "evaluate": {"finetuned_eval_loss": 0.5, "base_eval_loss": 3.0}}
    config = {"run_name": "tracked-run", "training": {"learning_rate": cfg.learning_rate}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        ids = {log_to_mlflow("test-exp", config, inputs, run_dir, {}) for _ in range(2)}
    assert ids == {metrics["mlflow_run_id"]}
    client = MlflowClient(tracking_uri=uri)
    assert len(client.get_metric_history(metrics["mlflow_run_id"], "loss")) == STEPS
    assert client.get_run(metrics["mlflow_run_id"]).data.metrics["evaluate.finetuned_eval_loss"] == 0.5
