"""Held-out splits the dataset already has (dataset.eval_split): a DatasetDict's or a repository directory's
validation split is the eval set; refusals name the split and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.data import PC_ROWS, QA, chat, write_jsonl

# --- held-out splits the dataset already has ----------------------------------------------------------------

HELD = [{"prompt": f"Held-out question {i}?", "completion": f"Held-out answer {i}."} for i in range(5)]


def dataset_dict(path: Path, **splits: list[dict]) -> Path:
    import datasets

    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(path))
    return path


def test_a_validation_split_is_the_held_out_set(run, tmp_path):
    """The dataset's own validation split is held out whole (eval_fraction does not apply); a held-out row that
    repeats a training row is dropped, so nothing held out was trained on."""
    test = [{"prompt": "Test question?", "completion": "Test answer."}]
    data = dataset_dict(tmp_path / "dd", train=PC_ROWS, validation=HELD + [PC_ROWS[0]], test=test)
    report = run(data, eval_fraction=0.25)
    assert (report["train_rows"], report["eval_rows"]) == (12, 5)
    assert sorted(run.eval, key=str) == sorted(HELD, key=str)
    assert sorted(run.train, key=str) == sorted(PC_ROWS, key=str)
    assert report["split"] == "train" and report["splits"] == ["train", "validation", "test"]
    assert report["eval_source"] == {"kind": "split", "split": "validation", "input_rows": 6, "kept": 5,
                                     "dropped": {"empty": 0, "duplicate": 0, "too_long": 0, "in_train": 1}}
    assert report["test_source"]["kind"] == "split" and run.test == test  # the test split: scored by evaluate only
    report = run(data, eval_split="test")
    assert report["eval_rows"] == 1 and run.eval == test and report["test_source"] == {"kind": "none"}
    report = run(data, eval_split="validation", max_eval_samples=2)
    assert report["eval_rows"] == 2 and report["train_rows"] == 12


def test_without_a_held_out_split_eval_fraction_applies(run, tmp_path):
    data = dataset_dict(tmp_path / "dd", train=PC_ROWS, validation=HELD)
    report = run(data, eval_split="none", eval_fraction=0.25)
    assert (report["train_rows"], report["eval_rows"]) == (9, 3)
    assert report["eval_source"] == {"kind": "fraction", "eval_fraction": 0.25}
    report = run(dataset_dict(tmp_path / "only_train", train=PC_ROWS), eval_fraction=0.25)
    assert (report["train_rows"], report["eval_rows"]) == (9, 3) and report["eval_source"]["kind"] == "fraction"


def test_a_dataset_repository_directory_uses_its_validation_file(run, tmp_path):
    """A directory laid out like a hub dataset repository (data files named by split), read through
    datasets.load_dataset as a hub dataset is; its Arrow form goes to the stage's scratch, removed at the end, not to
    datasets' cache in HF_HOME (where every dataset a run reads would stay)."""
    import datasets

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", PC_ROWS)
    write_jsonl(repo / "data" / "validation.jsonl", HELD)
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = set(cache.rglob("*.arrow"))
    report = run(repo)
    assert (report["train_rows"], report["eval_rows"]) == (12, 5)
    assert report["eval_source"]["split"] == "validation" and sorted(report["splits"]) == ["train", "validation"]
    assert set(cache.rglob("*.arrow")) == before and not list(run.out.glob(".prepare_data.*"))


@pytest.mark.parametrize(
    ("layout", "options", "fragments"),
    [
        ("dict", {"eval_split": "dev"}, ("no split 'dev' (it has train, validation)", "dataset.eval_split")),
        ("dict", {"eval_split": "train"}, ("dataset.eval_split 'train' is the training split",)),
        ("file", {"eval_split": "validation"}, ("is a single file without splits", "auto or none")),
        ("dict_bad_row", {}, ("split validation row 2: messages[0].role 'robot' is not one of", "(format messages)")),
        ("dict_all_in_train", {}, ("split validation: 2 of 2 rows dropped (2 in_train), no rows left",
                                   "set dataset.eval_split none")),
    ],
)
def test_bad_held_out_splits(run, tmp_path, layout, options, fragments):
    if layout == "file":
        data = write_jsonl(tmp_path / "d.jsonl", PC_ROWS)
    elif layout == "dict_bad_row":
        good, bad = {"messages": chat("Q?", "A.")}, {"messages": [{"role": "robot", "content": "Q?"}]}
        data = dataset_dict(tmp_path / "dd", train=[{"messages": chat(q, a)} for q, a in QA], validation=[good, bad])
    elif layout == "dict_all_in_train":
        data = dataset_dict(tmp_path / "dd", train=PC_ROWS, validation=PC_ROWS[:2])
    else:
        data = dataset_dict(tmp_path / "dd", train=PC_ROWS, validation=HELD)
    run.fails(data, *fragments, **options)
