"""The example experiment end to end through profiles/local (README, "Experiments"): workflow/experiments/demo.yaml
narrowed to 2 learning rates x 1 LoRA rank, plus the base model, a few steps each. One real run shared by the
tests (module fixture): the leaderboard's rows and best run, the shared stages done once, MLflow's runs; then dry
runs on copies of the finished project: a second run does nothing, and changing, adding or removing a run
re-plans only that run's jobs and the leaderboard."""

from __future__ import annotations

import csv
import json
import re
import sqlite3
from pathlib import Path

import pytest
import yaml
from support.common import REPO
from support.workflow import copy_project, planned_counts, run_workflow

PER_RUN = ("preflight", "train", "merge", "evaluate", "summary", "plots")
LRS = [0.005, 0.05]


def experiment_config(lrs: list[float]) -> str:
    example = yaml.safe_load((REPO / "workflow" / "experiments" / "demo.yaml").read_text())
    example["sweep"] = {"training.learning_rate": lrs, "training.lora_r": [8]}
    example["training"] |= {"max_steps": 6, "eval_steps": 3, "save_steps": 6}
    example["evaluate"] = {"num_samples": 6, "max_new_tokens": 16}
    example["tracking"] = {"mlflow": True}
    return (REPO / "config.yaml").read_text() + yaml.safe_dump(example)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("experiment")
    (workdir / "config.yaml").write_text(experiment_config(LRS))
    (workdir / "data").symlink_to(REPO / "data")
    result = run_workflow(workdir)
    return workdir, planned_counts(result)


def leaderboard(workdir) -> list[dict]:
    with open(workdir / "results" / "leaderboard" / "leaderboard.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_leaderboard_has_a_row_per_run_and_per_base_entry(experiment):
    workdir, _ = experiment
    rows = leaderboard(workdir)
    assert {(row["name"], row["kind"]) for row in rows} == {("lr5e-3_r8", "finetuned"), ("lr0.05_r8", "finetuned"),
                                                              ("base", "base")}
    tuned = {row["name"]: row for row in rows if row["kind"] == "finetuned"}
    assert {float(row["setting training.learning_rate"]) for row in tuned.values()} == set(LRS)
    assert all(float(row["answer_loss finetuned"]) > 0 and row["answer_loss base"] != "n/a" for row in tuned.values())


def test_the_best_run_is_the_one_with_the_best_score(experiment):
    workdir, _ = experiment
    rows = leaderboard(workdir)
    score = {row["name"]: float(row[f"answer_loss {'finetuned' if row['kind'] == 'finetuned' else 'base'}"])
             for row in rows}
    best = min(score, key=score.get)  # experiment.direction min
    text = (workdir / "results" / "leaderboard" / "leaderboard.md").read_text()
    assert f"Best by answer_loss (lowest): {best} " in text
    assert (workdir / "results" / "leaderboard" / "figures" / "metric.png").stat().st_size > 0


def test_the_shared_stages_ran_once_and_every_run_had_its_own(experiment):
    workdir, jobs = experiment
    assert {rule: jobs[rule] for rule in ("build_demo_model", "model", "prepare_data", "evaluate_base")} == \
        dict.fromkeys(("build_demo_model", "model", "prepare_data", "evaluate_base"), 1)
    assert {rule: jobs[rule] for rule in PER_RUN} == dict.fromkeys(PER_RUN, len(LRS))
    shared = sorted(path.name.split("-")[0] for path in (workdir / "results" / "_shared").iterdir())
    assert shared == ["base", "data", "model"]
    manifest = yaml.safe_load((workdir / "results" / "lr0.05_r8" / "manifest.json").read_text())
    assert any(entry["path"].startswith("../_shared/data-") for entry in manifest["artifacts"])


def test_each_run_is_one_mlflow_run_tagged_with_its_sweep_values(experiment):
    workdir, _ = experiment
    with sqlite3.connect(workdir / "results" / "mlflow.db") as db:
        tags = db.execute("SELECT t.value, s.value FROM tags t JOIN tags s ON s.run_uuid = t.run_uuid"
                          " WHERE t.key = 'experiment.run' AND s.key = 'sweep.training.learning_rate'").fetchall()
    assert sorted(tags) == [("lr0.05_r8", "0.05"), ("lr5e-3_r8", "0.005")]


def test_a_second_run_does_nothing(experiment, tmp_path):
    workdir = copy_project(experiment[0], tmp_path / "project")
    assert planned_counts(run_workflow(workdir, "--dry-run")) == {}


@pytest.mark.parametrize("lrs, expected", [
    (LRS + [0.02], {**dict.fromkeys(PER_RUN, 1), "leaderboard": 1, "all": 1}),  # a run added: its jobs only
    ([LRS[0]], {"leaderboard": 1, "all": 1}),  # a run removed: the others are left alone
    ([LRS[0], 0.02], {**dict.fromkeys(PER_RUN, 1), "leaderboard": 1, "all": 1}),  # one run's setting changed
])
def test_changing_adding_or_removing_a_run_replans_only_its_jobs_and_the_leaderboard(experiment, tmp_path, lrs,
                                                                                     expected):
    workdir = copy_project(experiment[0], tmp_path / "project")
    (workdir / "config.yaml").write_text(experiment_config(lrs))
    assert planned_counts(run_workflow(workdir, "--dry-run")) == expected
    assert (workdir / "results" / "lr0.05_r8" / "manifest.json").is_file()  # a removed run's outputs stay


def test_a_changed_evaluate_setting_replans_the_evaluations_and_no_training(experiment, tmp_path):
    """An evaluate setting (a rule param, compared with the last run's: params built from the job's input files
    are not, so none of the settings may be) re-runs the shared base evaluation and each run's evaluation, and
    nothing before them."""
    workdir = copy_project(experiment[0], tmp_path / "project")
    counts = planned_counts(run_workflow(workdir, "--dry-run", "--config", "evaluate__max_new_tokens=8"))
    assert counts.get("evaluate_base") == 1 and counts.get("evaluate") == 2, counts
    assert not {"train", "merge", "prepare_data", "preflight"} & counts.keys(), counts


def test_the_report_of_an_experiment_opens_on_the_leaderboard_and_tells_the_runs_apart(experiment, tmp_path):
    """`snakemake --report` over the finished experiment: the leaderboard (page and figures) is the first category,
    and every run's pages and figures are there once, each labelled with its run."""
    workdir = copy_project(experiment[0], tmp_path / "project")
    report = tmp_path / "report.html"
    run_workflow(workdir, "--report", str(report))
    text = report.read_text()
    results = json.loads(re.search(r"var results = (\{.*?\});\n", text, re.S).group(1))
    categories = json.loads(re.search(r"var categories = (\{.*?\});\n", text, re.S).group(1))
    # the report's menu lists the categories sorted by name (menu.js: Object.keys(categories).sort(localeCompare))
    assert sorted(categories)[0] == "0. Leaderboard" and len(categories) == 7, list(categories)
    board = {Path(path).name: res for path, res in results.items() if "/leaderboard/" in path}
    assert {"leaderboard.html", "metric.png"} <= board.keys(), sorted(board)
    runs = ["lr5e-3_r8", "lr0.05_r8"]  # named from LRS, as the leaderboard test has them
    overviews = {res["labels"]["run"]: path for path, res in results.items() if path.endswith("overview.html")}
    assert sorted(overviews) == sorted(runs) and all(f"/{run}/report/" in overviews[run] for run in runs)
    for name in ("curves.png", "evaluation.html", "config.html"):
        labelled = sorted(res["labels"]["run"] for path, res in results.items() if path.endswith(name))
        assert labelled == sorted(runs), name
