"""The test set of the data stage (dataset.test_path, dataset.test_split): read in any form the stage reads,
checked row by row against the training format, cleaned, without rows the model trains on or watches, and
written to test.jsonl (empty: no test set); refusals name the file, the row or the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.common import REPO, write_input
from support.data import PC_ROWS, chat, write_jsonl

TEST = [{"prompt": f"Test question {i}?", "completion": f"Test answer {i}."} for i in range(4)]


def dataset_dict(path: Path, **splits: list[dict]) -> Path:
    import datasets

    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "dataset"])
def test_a_test_path_in_any_form_is_the_test_set(run, tmp_path, kind):
    """A repeated row and a row that is also a training row are dropped: nothing scored was trained on."""
    (tmp_path / "t").mkdir()
    test_path = write_input(kind, tmp_path / "t", TEST + [TEST[0], PC_ROWS[3]])
    report = run(write_jsonl(tmp_path / "train.jsonl", PC_ROWS), test_path=str(test_path), eval_fraction=0.25)
    assert sorted(run.test, key=str) == sorted(TEST, key=str) and report["test_rows"] == 4
    assert report["test_source"] == {"kind": "path", "path": str(test_path), "input_rows": 6, "kept": 4,
                                     "dropped": {"empty": 0, "duplicate": 1, "too_long": 0, "in_train": 1}}
    assert not {str(r) for r in run.test} & {str(r) for r in run.rows()}


def test_test_rows_keep_their_other_columns_for_group_metrics(run, tmp_path):
    """A test row's other scalar columns (a category for evaluate.group_field) stay in test.jsonl; the training and
    held-out rows keep none, and a test row that repeats a training row is still dropped (the digest leaves the
    other columns out). A column a format reads, or a nested value, is not carried over."""
    tagged = [row | {"category": f"c{i % 2}", "score": i, "nested": {"a": 1}, "text": "x"}
              for i, row in enumerate(TEST)]
    train = [row | {"category": "train"} for row in PC_ROWS]
    report = run(write_jsonl(tmp_path / "train.jsonl", train), eval_fraction=0.25,
                 test_path=str(write_jsonl(tmp_path / "test.jsonl", tagged + [PC_ROWS[3] | {"category": "x"}])))
    assert sorted(run.test, key=str) == sorted([row | {"category": f"c{i % 2}", "score": i}
                                                for i, row in enumerate(TEST)], key=str)
    assert report["test_source"]["dropped"]["in_train"] == 1
    assert all(set(row) == {"prompt", "completion"} for row in run.rows())


def test_without_a_test_set_test_jsonl_is_empty(run, tmp_path):
    report = run(write_jsonl(tmp_path / "train.jsonl", PC_ROWS))
    assert run.test == [] and report["test_source"] == {"kind": "none"} and report["test_rows"] == 0


def test_a_test_split_is_the_test_set_and_a_held_out_one_stays_the_eval_set(run, tmp_path):
    held = [{"prompt": "Held question?", "completion": "Held answer."}]
    data = dataset_dict(tmp_path / "dd", train=PC_ROWS, validation=held, test=TEST)
    report = run(data)
    assert run.eval == held and sorted(run.test, key=str) == sorted(TEST, key=str)
    assert report["test_source"]["kind"] == "split" and report["test_source"]["split"] == "test"
    assert run(data, test_split="none")["test_source"] == {"kind": "none"} and run.test == []
    # only train and test: test stays the held-out split (as before) unless eval_split none frees it
    only = dataset_dict(tmp_path / "only", train=PC_ROWS, test=TEST)
    assert run(only)["test_source"] == {"kind": "none"} and len(run.eval) == 4
    report = run(only, eval_split="none", eval_fraction=0.25)
    assert report["eval_source"]["kind"] == "fraction" and len(run.test) == 4
    report = run(only, test_split="test")  # named: the held-out split is looked for among the others
    assert len(run.test) == 4 and report["eval_source"]["kind"] == "fraction"
    # dataset.test_path wins over the split
    report = run(data, test_path=str(write_jsonl(tmp_path / "mine.jsonl", TEST[:2])))
    assert report["test_source"]["kind"] == "path" and len(run.test) == 2


def test_the_shipped_triage_set_has_train_validation_and_test_splits(run):
    report = run(REPO / "data" / "demo" / "triage")
    assert (report["train_rows"], report["eval_rows"], report["test_rows"]) == (60, 30, 30)
    assert {row["messages"][-1]["content"] for row in run.test} == {"urgent", "routine"}


@pytest.mark.parametrize(
    ("test_rows", "options", "fragments"),
    [
        ([TEST[0], {"question": "q", "answer": "a"}], {},
         ["row 2: the prompt_completion format (the training data's) needs the field(s) prompt and completion; "
          "this row has answer, question"]),
        ([{"messages": chat("q", "a")}], {}, ["row 1: the prompt_completion format", "this row has messages"]),
        ([], {}, ["the test set has no rows"]),
        ([PC_ROWS[0], PC_ROWS[1]], {}, ["2 of 2 rows dropped (2 in_train), no rows left"]),
    ],
    ids=["missing_fields", "other_format", "empty", "all_trained_on"],
)
def test_bad_test_sets_name_the_file_and_row(run, tmp_path, test_rows, options, fragments):
    test_path = write_jsonl(tmp_path / "test.jsonl", test_rows)
    run.fails(write_jsonl(tmp_path / "train.jsonl", PC_ROWS), f"test set {test_path}", *fragments,
              test_path=str(test_path), **options)


def test_bad_test_split_names_the_key(run, tmp_path):
    data = dataset_dict(tmp_path / "dd", train=PC_ROWS, validation=TEST)
    run.fails(data, "no split 'tests'", "dataset.test_split", test_split="tests")
    run.fails(data, "dataset.test_split 'validation' is also the held-out split", test_split="validation",
              eval_split="validation")
    run.fails(write_jsonl(tmp_path / "train.jsonl", PC_ROWS), "dataset.test_split 'test'", "has no splits",
              test_split="test")
    run.fails(data, "dataset.test_path", "not found", test_path=str(tmp_path / "missing.jsonl"))
