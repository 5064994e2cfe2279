"""What an experiment plans (dry runs of the real Snakefile, nothing trained): the shared stages once per content
key (model per model, data per dataset and tokenizer, base evaluation per base model, test set and evaluate
settings), every per-run stage once per run, one leaderboard; a single run of a set alone; refusals before any job."""

from __future__ import annotations

from pathlib import Path

import yaml
from support.common import REPO
from support.workflow import planned_counts, run_workflow

PER_RUN = ("preflight", "train", "merge", "evaluate", "summary", "plots")


def project(tmp_path: Path, experiment: dict) -> Path:
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text()
                                         + (yaml.safe_dump(experiment) if experiment else ""))
    (tmp_path / "data").symlink_to(REPO / "data")
    return tmp_path


def plan(workdir: Path, *args: str) -> dict[str, int]:
    return planned_counts(run_workflow(workdir, "--dry-run", *args))


def test_two_models_by_two_learning_rates_share_each_models_fetch_data_and_base_evaluation(tmp_path):
    jobs = plan(project(tmp_path, {
        "runs": {"a": {"model": {"source": "local", "path": "/models/a"}},
                 "b": {"model": {"source": "local", "path": "/models/b"}}},
        "sweep": {"training.learning_rate": [0.01, 0.02]}}))
    assert {rule: jobs[rule] for rule in ("model", "prepare_data", "evaluate_base")} == \
        {"model": 2, "prepare_data": 2, "evaluate_base": 2}
    assert {rule: jobs[rule] for rule in PER_RUN} == dict.fromkeys(PER_RUN, 4)
    assert jobs["leaderboard"] == 1 and "build_demo_model" not in jobs


def test_one_model_by_three_learning_rates_evaluates_the_base_once_and_one_run_runs_alone(tmp_path):
    workdir = project(tmp_path, {"sweep": {"training.learning_rate": [0.01, 0.02, 0.03]}})
    jobs = plan(workdir)
    assert {rule: jobs[rule] for rule in ("build_demo_model", "model", "prepare_data", "evaluate_base")} == \
        dict.fromkeys(("build_demo_model", "model", "prepare_data", "evaluate_base"), 1)
    assert jobs["train"] == 3 and jobs["evaluate"] == 3
    # one run of the set, by its target: its own stages and the shared ones it needs, no other run's
    alone = plan(workdir, "results/lr0.02/manifest.json")
    assert alone["train"] == 1 and alone["evaluate"] == 1 and "leaderboard" not in alone


def test_a_bad_experiment_stops_snakemake_before_any_job(tmp_path):
    workdir = project(tmp_path, {"sweep": {"training.learnig_rate": [0.01, 0.02]}})
    result = run_workflow(workdir, "--dry-run", check=False)
    assert result.returncode != 0
    assert "did you mean 'training.learning_rate'" in result.stderr
    assert not (workdir / "results").exists()


def test_the_single_run_config_plans_what_it_always_did(tmp_path):
    jobs = plan(project(tmp_path, {}))
    assert jobs == {"build_demo_model": 1, "model": 1, "prepare_data": 1, "preflight": 1, "train": 1, "merge": 1,
                    "evaluate": 1, "summary": 1, "plots": 1, "all": 1}
    assert not (tmp_path / "results" / "_shared").exists()
