"""Leaderboard stage (scripts/leaderboard.py, hpc_finetune.report.leaderboard) on the shared demo run's real
outputs: the demo run, a copy of it whose resources.csv also holds GPU power samples (this machine has no GPU),
and a base-only entry whose base.json the evaluate stage's base part writes here from the demo's model and data
(it must give the base side of the demo's own evaluate.json). The bad entries, each with its message."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from pathlib import Path

import pytest
from hpc_finetune.io.cli import StageError
from hpc_finetune.report.leaderboard import energy_and_gpu_hours

# two GPUs sampled at 0, 10 and 30 s: gpu0 100, 200, 200 W, gpu1 50 W throughout
GPU_ROWS = [(0, "gpu0", 100), (10, "gpu0", 200), (30, "gpu0", 200), (0, "gpu1", 50), (10, "gpu1", 50),
            (30, "gpu1", 50)]
GPU_JOULES = (10 * 150 + 20 * 200) + 30 * 50  # trapezoids per GPU, summed


@pytest.fixture(scope="module")
def board_inputs(run_dir, tmp_path_factory) -> dict:
    import evaluate

    root = tmp_path_factory.mktemp("leaderboard")
    gpu_run = root / "demo-gpu"
    (gpu_run / "metrics").mkdir(parents=True)
    for name in ("evaluate.json", "train.json", "resources.csv"):
        shutil.copy(run_dir / "metrics" / name, gpu_run / "metrics" / name)
    with open(gpu_run / "metrics" / "resources.csv", "a", newline="") as fh:
        writer = csv.writer(fh)
        for elapsed, device, watts in GPU_ROWS:
            writer.writerow([elapsed, 0, device, 1000, 50, watts, 60])
    # the evaluate stage's two parts as the rule runs the stage: in the project directory, on the same relative paths
    rel = {name: f"results/demo/data/{name}.jsonl" for name in ("train", "eval", "test")}
    common = dict(model_json="results/demo/model/model.json", train_data=rel["train"], eval_data=rel["eval"],
                  test_data=rel["test"], max_new_tokens=64)  # the demo preset's evaluate settings
    with contextlib.chdir(run_dir.parent.parent):
        base = evaluate.main(evaluate.Config(part="base", metrics_out=str(root / "base" / "base.json"),
                                             samples_out=str(root / "base" / "base.jsonl"), **common))
        tuned = evaluate.main(evaluate.Config(  # the base side from the base part's files
            part="finetuned", finetuned="results/demo/merged", base_metrics=str(root / "base" / "base.json"),
            base_samples=str(root / "base" / "base.jsonl"), metrics_out=str(root / "tuned" / "evaluate.json"),
            samples_out=str(root / "tuned" / "samples.jsonl"), **common))
    entries = [
        {"name": "demo", "kind": "finetuned", "model": "demo", "dataset": "medical_qa",
         "settings": {"training.learning_rate": 0.01}, "run_dir": str(run_dir), "base_metrics": None},
        {"name": "demo-gpu", "kind": "finetuned", "model": "demo", "dataset": "medical_qa",
         "settings": {"training.learning_rate": 0.02}, "run_dir": str(gpu_run), "base_metrics": None},
        {"name": "demo-base", "kind": "base", "model": "demo", "dataset": "medical_qa", "settings": {},
         "run_dir": None, "base_metrics": str(root / "base" / "base.json")},
    ]
    return {"root": root, "entries": entries, "base": base, "tuned": tuned,
            "evaluate": json.loads((run_dir / "metrics" / "evaluate.json").read_text()),
            "train": json.loads((run_dir / "metrics" / "train.json").read_text())}


def make(inputs: dict, name: str, entries=None, metric="answer_loss", direction="min") -> dict:
    import leaderboard

    out = inputs["root"] / name
    return leaderboard.main(leaderboard.Config(
        entries=json.dumps(inputs["entries"] if entries is None else entries), metric=metric, direction=direction,
        out_csv=str(out / "leaderboard.csv"), out_md=str(out / "leaderboard.md"), figures_dir=str(out),
        out_html=str(out / "leaderboard.html")))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_two_evaluate_parts_on_the_demo_give_its_evaluate_json(board_inputs, run_dir):
    """The base part, then the fine-tuned part with the base part's files (the experiment's shared base
    evaluation), on the demo run's model, merged model and data: exactly the metrics of the demo's own evaluate
    stage (--part both)."""
    stage, base, tuned = board_inputs["evaluate"], board_inputs["base"], board_inputs["tuned"]
    same({k: v["base"] for k, v in base["metrics"].items()}, {k: v["base"] for k, v in stage["metrics"].items()})
    assert base["scored_on"] == stage["scored_on"]
    same(base["base_train_loss"], stage["base_train_loss"])
    volatile = {"wall_time_s", "peak_memory", "samples_files", "generation"}  # of the processes: times
    same({k: v for k, v in tuned.items() if k not in volatile}, {k: v for k, v in stage.items() if k not in volatile})
    assert tuned["generation"]["models"].keys() == stage["generation"]["models"].keys() == {"base", "finetuned"}
    demo_samples = [json.loads(x) for x in (run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [json.loads(x) for x in (board_inputs["root"] / "tuned" / "samples.jsonl").read_text().splitlines()] == \
        demo_samples


def same(mine, theirs, where: str = "evaluate.json") -> None:
    """Equal, floats to 1e-6 (relative): the demo's stage ran in a process of its own, whose torch may use
    another number of threads (another summation order); answers, scores of answers and counts exactly."""
    if isinstance(mine, float) and isinstance(theirs, float):
        assert mine == pytest.approx(theirs, rel=1e-6, abs=1e-9), where
    elif isinstance(mine, dict) and isinstance(theirs, dict):
        assert mine.keys() == theirs.keys(), where
        for key in mine:
            same(mine[key], theirs[key], f"{where}.{key}")
    elif isinstance(mine, list) and isinstance(theirs, list):
        assert len(mine) == len(theirs), where
        for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            same(a, b, f"{where}[{index}]")
    else:
        assert mine == theirs, where


def test_one_row_per_entry_with_every_metric_the_cost_and_the_best(board_inputs):
    board = make(board_inputs, "loss-min")
    stage, train = board_inputs["evaluate"], board_inputs["train"]
    rows = {r["name"]: r for r in read_csv(board_inputs["root"] / "loss-min" / "leaderboard.csv")}
    assert list(rows) == ["demo", "demo-gpu", "demo-base"]
    demo, gpu, base = rows["demo"], rows["demo-gpu"], rows["demo-base"]
    assert demo["setting training.learning_rate"] == "0.01" and gpu["setting training.learning_rate"] == "0.02"
    for metric, values in stage["metrics"].items():  # every evaluate metric, base and fine-tuned, and the difference
        assert float(demo[f"{metric} base"]) == pytest.approx(values["base"], rel=1e-3)
        assert float(demo[f"{metric} finetuned"]) == pytest.approx(values["finetuned"], rel=1e-3)
        assert float(demo[f"{metric} diff"]) == pytest.approx(values["finetuned"] - values["base"], rel=1e-3, abs=1e-4)
        assert float(base[f"{metric} base"]) == pytest.approx(values["base"], rel=1e-3)
        assert base[f"{metric} finetuned"] == "n/a" and base[f"{metric} diff"] == "n/a"
    assert float(demo["eval_loss"]) == pytest.approx(train["eval_loss_last"], rel=1e-3)
    assert float(demo["train_loss"]) == pytest.approx(train["train_loss_last"], rel=1e-3)
    assert demo["convergence"] == train["convergence"]["verdict"]
    assert float(demo["tokens_per_s"]) == pytest.approx(train["tokens_per_second"], rel=1e-3)
    assert float(demo["peak_memory_mb"]) == pytest.approx(train["peak_memory"]["peak_rss_mb"], rel=1e-3)
    assert demo["gpu_hours"] == "n/a" and demo["energy_kwh"] == "n/a"  # the demo trained on the CPU
    assert float(gpu["energy_kwh"]) == pytest.approx(GPU_JOULES / 3.6e6, rel=1e-3)
    assert float(gpu["gpu_hours"]) == pytest.approx(train["train_seconds"] * 2 / 3600, rel=1e-3)
    assert base["convergence"] == "n/a" and base["energy_kwh"] == "n/a"
    # the best by the lowest answer loss: the fine-tuned demo (its loss is below its base's); by the highest: the base
    assert stage["metrics"]["answer_loss"]["finetuned"] < stage["metrics"]["answer_loss"]["base"]
    assert board["best"] == "demo"
    assert make(board_inputs, "loss-max", direction="max")["best"] == "demo-base"
    md = (board_inputs["root"] / "loss-min" / "leaderboard.md").read_text()
    assert "Best by answer_loss (lowest): demo (finetuned" in md and "| best | demo | finetuned |" in md
    assert "## Every evaluate metric" in md and md.count("\n| demo") == 3
    for name in ("metric.png", "eval_loss.png"):
        assert (board_inputs["root"] / "loss-min" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_single_run_is_its_base_vs_finetuned_table_and_the_html_section(board_inputs):
    from hpc_finetune.report.leaderboard import leaderboard_html

    board = make(board_inputs, "single", entries=board_inputs["entries"][:1], metric="token_f1", direction="max")
    md = (board_inputs["root"] / "single" / "leaderboard.md").read_text()
    assert md.startswith("# demo: base vs fine-tuned (demo, medical_qa)")
    assert "| metric | base | fine-tuned | difference |" in md
    for metric in board_inputs["evaluate"]["metrics"]:
        assert f"| {metric} |" in md
    section = leaderboard_html(board, {k: Path(v) for k, v in board["figures"].items()})
    assert "<h2>Leaderboard</h2>" in section and "Best by token_f1 (highest): demo" in section
    assert section.count("data:image/png;base64,") == 2
    assert section in (board_inputs["root"] / "single" / "leaderboard.html").read_text()  # --out-html: the page


def test_bad_entries_are_clear_errors(board_inputs, tmp_path):
    good = board_inputs["entries"]
    run = {**good[0]}
    cases = [
        ("not json", r"--entries is not valid JSON"),
        ([], r"--entries must be a non-empty JSON list"),
        ([run | {"kind": "tuned"}], r"entry 1 \(demo\): kind 'tuned' is not one of finetuned, base"),
        ([run | {"run_dir": None}], r"entry 1 \(demo\): a finetuned entry needs run_dir"),
        ([good[2] | {"base_metrics": None}], r"entry 1 \(demo-base\): a base entry needs base_metrics"),
        ([run | {"settings": "lr"}], r"entry 1 \(demo\): settings must be a dict"),
        ([run, run], r"entry 2 \(demo\): the name 'demo' is used twice"),
        ([run | {"run_dir": str(tmp_path / "gone")}], r"entry demo: run_dir .*gone does not exist"),
        ([good[2] | {"base_metrics": str(tmp_path / "base.json")}],
         r"entry demo-base: base metrics .*base.json is missing"),
    ]
    (tmp_path / "half" / "metrics").mkdir(parents=True)
    shutil.copy(Path(run["run_dir"]) / "metrics" / "resources.csv", tmp_path / "half" / "metrics")
    cases.append(([run | {"run_dir": str(tmp_path / "half")}], r"entry demo: evaluate metrics .*evaluate.json is missing"))
    for entries, message in cases:
        with pytest.raises(StageError, match=message):
            if isinstance(entries, str):
                _raw(board_inputs, entries)
            else:
                make(board_inputs, "bad", entries=entries, metric="token_f1")
    with pytest.raises(StageError, match=r"--metric 'bleu' is not an evaluate metric of these entries; known: "
                                         r"answer_loss, perplexity, exact_match, token_f1, rouge_l"):
        make(board_inputs, "bad", metric="bleu")
    with pytest.raises(StageError, match=r"--direction 'up' is not one of max, min"):
        make(board_inputs, "bad", direction="up")


def _raw(inputs: dict, text: str) -> dict:
    import leaderboard

    out = inputs["root"] / "raw"
    return leaderboard.main(leaderboard.Config(entries=text, metric="token_f1", out_csv=str(out / "l.csv"),
                                               out_md=str(out / "l.md"), figures_dir=str(out)))


def test_energy_is_the_integral_of_the_gpu_power_samples():
    rows = [{"elapsed_s": str(t), "device": d, "power_w": str(w)} for t, d, w in GPU_ROWS]
    rows += [{"elapsed_s": "5", "device": "cpu", "power_w": ""}]
    kwh, hours = energy_and_gpu_hours(rows, 7200.0)
    assert kwh == pytest.approx(GPU_JOULES / 3.6e6) and hours == pytest.approx(4.0)
    assert energy_and_gpu_hours(rows[-1:], 7200.0) == (None, None)  # the CPU alone: n/a
    no_power = [r | {"power_w": ""} for r in rows[:3]]  # a board that reports no power: GPU-hours, no energy
    assert energy_and_gpu_hours(no_power, 3600.0) == (None, 1.0)
