"""Summary stage: write the run's manifest and training.env, and end the log with a table of what was achieved.

    python scripts/summary.py --config-json "$(cat effective.json)" \
        --manifest-out results/demo/manifest.json --env-out results/demo/training.env

manifest.json: the sha256 and size of every artifact (adapters/, merged/, data, model record, metrics), the key
metrics (train and eval loss first -> last, steps, tokens, wall time, peak memory, merge and evaluation results),
library versions and the workflow commit. training.env: the effective configuration as KEY=value lines, with
secrets redacted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.io.cli import StageError, cli, log, plural, table
from hpc_finetune.io.files import read_json, write_json, write_text
from hpc_finetune.serve.plan import serve_skipped
from hpc_finetune.summary.manifest import artifacts, env_text, flatten, fmt, load_metrics, redact, versions


@dataclass
class Config:
    config_json: str = field(metadata={"help": "the effective configuration as JSON"})
    manifest_out: str = field(metadata={"help": "manifest to write (JSON), at the top of the run directory"})
    env_out: str = field(metadata={"help": "training.env to write"})
    model_json: str = field(default="", metadata={
        "help": "the model record, when not model/model.json in the run directory (an experiment's runs share it)"})
    workflow_commit: str = field(default="unknown", metadata={"help": "the workflow's git commit (from the workflow)"})
    artifacts: list[str] = field(default_factory=list, metadata={
        "help": "JSON list of the files and directories whose files the manifest lists (the stages' outputs), "
                "besides training.env"})


def main(cfg: Config) -> dict:
    run_dir = Path(cfg.manifest_out).parent
    try:
        effective = json.loads(cfg.config_json)
    except json.JSONDecodeError as err:
        raise StageError(f"--config-json is not valid JSON: {err}") from None
    write_text(cfg.env_out, env_text(effective))
    manifest_path = Path(cfg.manifest_out)
    model = read_json(Path(cfg.model_json) if cfg.model_json else run_dir / "model" / "model.json", "model record")
    metrics = load_metrics(run_dir)
    if "serve_check" not in metrics:
        metrics["serve_check"] = {"skipped": serve_skipped(effective)}
    manifest = {
        "run_name": effective.get("run_name"),
        "model": {
            k: model.get(k) for k in ("source", "model_id", "revision", "commit", "num_parameters", "fingerprint")
        },
        "config": redact(flatten(effective)),
        "metrics": metrics,
        "versions": versions(),
        "workflow_commit": None if cfg.workflow_commit == "unknown" else cfg.workflow_commit,
        "artifacts": artifacts(run_dir, [*cfg.artifacts, cfg.env_out]),
    }
    write_json(manifest_path, manifest)
    rows = [
        ("train loss", f"{fmt(metrics['train_loss_first'])} -> {fmt(metrics['train_loss_last'])}"),
        ("eval loss", f"{fmt(metrics['eval_loss_first'])} -> {fmt(metrics['eval_loss_last'])}"),
        ("steps / tokens", f"{metrics['steps']} / {metrics['tokens']}"),
        ("train wall time", f"{fmt(metrics['train_wall_time_s'])} s"),
        ("peak memory", metrics["peak_memory"]),
        ("convergence", metrics["convergence"]["verdict"]),
        *(("  reason", reason) for reason in metrics["convergence"]["reasons"] or ()),
    ]
    rows += [(k, fmt(metrics[k])) for k in ("merge_max_abs_logit_diff", "base_eval_exact_match", "eval_exact_match")
             if k in metrics]
    check = metrics["serve_check"]
    rows.append(("served by vLLM", f"{check['vllm_version']} ({check['dtype']}), match rate " + ", ".join(
        f"{name} {rate:.3f}" for name, rate in check["match_rate"].items()) if "vllm_version" in check
        else f"not checked: {check['skipped']}"))
    rows += [("artifacts", plural(len(manifest['artifacts']), "file")), ("manifest", manifest_path)]
    log.info("\n%s", table(rows, f"Run {effective.get('run_name')}"))
    return manifest


if __name__ == "__main__":
    cli(main, Config, __doc__)
