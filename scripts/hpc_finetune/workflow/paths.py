"""Where a run's outputs are, what each rule's program is and which files it depends on, and the command-line
arguments each stage program receives (shell-quoted; as rule params, a changed value re-runs the rule)."""

from __future__ import annotations

import functools
import json
import shlex
from pathlib import Path
from typing import Any

from hpc_finetune import code

SCRIPTS = code.SOURCE_ROOT
EXPERIMENT_ONLY = ("runs", "sweep", "experiment")


def run_dir(cfg: dict) -> str:
    return f"{cfg['output_dir']}/{cfg['run_name']}"


def out(cfg: dict, *parts: str) -> str:
    """Path of one output of the run: {output_dir}/{run_name}/{parts}."""
    return "/".join([run_dir(cfg), *parts])


def stage_key(cfg: dict, stage: str) -> str:
    """The directory, under output_dir, of a stage that runs share ("model", "data", "base"): in an experiment its
    content key (_shared/<stage>-<hash>, hpc_finetune.workflow.experiment), for a single run the run's name."""
    return cfg.get("_shared", {}).get(stage, cfg["run_name"])


def stage_dir(cfg: dict, stage: str) -> str:
    return f"{cfg['output_dir']}/{stage_key(cfg, stage)}"


def model_out(cfg: dict, *parts: str) -> str:
    """An output of the model stage the run uses (model/model.json, model/demo)."""
    return "/".join([stage_dir(cfg, "model"), "model", *parts])


def data_out(cfg: dict, name: str) -> str:
    """A file of the prepared data the run uses (data/train.jsonl, eval, test, report.json)."""
    return f"{stage_dir(cfg, 'data')}/data/{name}"


def base_out(cfg: dict, name: str) -> str:
    """An output of the base model's shared evaluation (experiments only): eval/base.json, base.jsonl."""
    return f"{stage_dir(cfg, 'base')}/eval/{name}"


def script(name: str) -> str:
    """Absolute path of a stage program."""
    return str(SCRIPTS / f"{name}.py")


@functools.cache
def code_inputs(*names: str) -> list[str]:
    """The stage programs `names` and every project module they import (hpc_finetune.code.closure): the code
    inputs of a rule, so that editing a module re-runs exactly the stages that use it."""
    return [str(path) for path in code.closure(*(script(name) for name in names))]


def _arg_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def stage_args(**options: Any) -> str:
    """`--name value` arguments for a stage script, shell-quoted. Used as a rule param, so a changed value
    re-runs the rule (Snakemake's params trigger) and nothing else."""
    return " ".join(f"--{k.replace('_', '-')} {shlex.quote(_arg_value(v))}" for k, v in options.items())


def pick(section: dict, *keys: str) -> dict:
    return {k: section[k] for k in keys}


def local_dataset(path: str) -> list[str]:
    """The dataset as a rule input when it is on disk (so editing it re-runs the data stage); a hub name is not."""
    return [path] if Path(path).exists() else []


def final_model(cfg: dict) -> str:
    """What the later stages evaluate: the merged model, or the adapter when merging is off."""
    return out(cfg, "merged") if cfg["merge"]["merge_full_weights"] else out(cfg, "adapters")


def summary_inputs(cfg: dict, serve_on: bool) -> dict[str, str]:
    """Every artifact the manifest covers: the declared outputs, under the run directory, of the stages before the
    summary (its inputs). Each is also a target of the run (final_targets), so a missing one is rebuilt with its
    stage and what depends on it, and the manifest never lists a file that no rule makes. `serve_on`: whether
    serve_check runs (hpc_finetune.serve.plan; resolved once per run: common.smk's SERVE and ARTIFACTS)."""
    inputs = {
        **({"base_model": model_out(cfg, "demo")} if cfg["model"]["source"] == "demo" else {}),
        "model": model_out(cfg, "model.json"),
        **{f"data_{name}": data_out(cfg, f"{name}.jsonl") for name in ("train", "eval", "test")},
        "data_report": data_out(cfg, "report.json"),
        "preflight": out(cfg, "preflight.json"),
        "adapters": out(cfg, "adapters"),
        "train_metrics": out(cfg, "metrics", "train.json"),
        "train_resources": out(cfg, "metrics", "resources.csv"),
    }
    if cfg["merge"]["merge_full_weights"]:
        inputs.update(merged=out(cfg, "merged"), merge_report=out(cfg, "metrics", "merge.json"))
    if cfg["evaluate"]["enabled"]:
        inputs.update(evaluate=out(cfg, "metrics", "evaluate.json"), eval_samples=out(cfg, "eval", "samples.jsonl"),
                      eval_csv=out(cfg, "eval", "samples.csv"), eval_report=out(cfg, "eval", "report.txt"))
    if serve_on:
        inputs["serve_check"] = out(cfg, "metrics", "serve_check.json")
    return inputs


def report_inputs(cfg: dict) -> dict[str, str]:
    """What the plots stage reads: the train metrics and resource samples, the data report, the evaluate and
    merge results and the benchmarks of the stages this config runs."""
    inputs = {
        "train": out(cfg, "metrics", "train.json"),
        "resources": out(cfg, "metrics", "resources.csv"),
        "data": data_out(cfg, "report.json"),
        "train_benchmark": out(cfg, "benchmarks", "train.tsv"),
    }
    if cfg["merge"]["merge_full_weights"]:
        inputs.update(merge=out(cfg, "metrics", "merge.json"), merge_benchmark=out(cfg, "benchmarks", "merge.tsv"))
    if cfg["evaluate"]["enabled"]:
        inputs.update(evaluate=out(cfg, "metrics", "evaluate.json"), samples=out(cfg, "eval", "samples.jsonl"),
                      evaluate_benchmark=out(cfg, "benchmarks", "evaluate.tsv"))
    return inputs


def upload_dirs(cfg: dict) -> list[str]:
    """The directories the upload stage sends (besides the manifest)."""
    include = set(cfg["upload"]["include"]) - ({"merged"} if not cfg["merge"]["merge_full_weights"] else set())
    return [out(cfg, name) for name in ("merged", "adapters") if name in include]


def final_targets(cfg: dict, artifacts: dict[str, str]) -> list[str]:
    """What `rule all` asks for: the manifest and every artifact it lists (`artifacts`, summary_inputs: adapters/,
    merged/, the data, the metrics...: a deleted one is rebuilt, not reported done), the report's pages, and the
    upload records when a bucket or a Hub repository is set."""
    return [out(cfg, "manifest.json"), *artifacts.values(), out(cfg, "report", "overview.html"),
            *([out(cfg, "upload.json")] if cfg["upload"]["bucket"] else []),
            *([out(cfg, "hub_upload.json")] if cfg["hub_upload"]["repo_id"] else [])]


def hub_upload_dirs(cfg: dict) -> dict[str, str]:
    """The directories the Hub upload publishes: adapters and merged, as hub_upload.publish and merging allow."""
    publish = set(cfg["hub_upload"]["publish"]) - ({"merged"} if not cfg["merge"]["merge_full_weights"] else set())
    return {directory: out(cfg, directory) for kind, directory in (("adapter", "adapters"), ("merged", "merged"))
            if kind in publish}


def summary_config(cfg: dict) -> str:
    """The effective config for the summary and plots stages, without where the results are uploaded to or
    tracked: pointing an upload or MLflow elsewhere must not re-run the summary (whose manifest the uploads send),
    and a tracking URI may hold credentials, which belong on no command line. Nor the experiment's keys (runs:,
    sweep:, experiment.*, the resolved run's _shared...): a run's stages see the run's own settings only."""
    return json.dumps({k: v for k, v in cfg.items() if k not in ("upload", "hub_upload", "tracking", *EXPERIMENT_ONLY)
                       and not k.startswith("_")}, sort_keys=True)
