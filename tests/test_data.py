"""The data stage (scripts/prepare_data.py): every input kind and format, the split, sampling and determinism.
In-process, on the demo tokenizer; the counts and bad input are in test_data_errors.py, held-out splits in
test_data_splits.py."""

from __future__ import annotations

import json

import prepare_data
import pytest
from hpc_finetune.data import source as dataset_source
from hpc_finetune.io.cli import parse_args
from support.common import write_input
from support.data import BOS, PC_ROWS, Run, chat, write_jsonl

# --- input kinds --------------------------------------------------------------------------------------------


KINDS = [
    "json_array",
    "json_lines",
    "jsonl",
    "csv",
    "parquet",
    "arrow_file",
    "arrow_stream",
    "dataset",
    "dataset_dict",
]


@pytest.mark.parametrize("kind", KINDS)
def test_every_input_kind(run, tmp_path, kind):
    data = write_input(kind, tmp_path, PC_ROWS)
    report = run(data, split="test", eval_fraction=0.25)
    assert report["input_rows"] == 12 and report["kept"] == 12 and report["format"] == "prompt_completion"
    assert (report["train_rows"], report["eval_rows"]) == (9, 3)
    assert sorted(run.rows(), key=str) == sorted(PC_ROWS, key=str)


def test_arrow_file_written_by_datasets(run, tmp_path):
    data = write_input("dataset", tmp_path, PC_ROWS)
    run(next(data.glob("*.arrow")), eval_fraction=0)
    assert run.train == run.rows() and len(run.train) == 12


# --- formats ------------------------------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "Be brief."}
FORMAT_CASES = {
    "messages": (
        {"messages": [SYSTEM, *chat("Q?", "A.")], "source": "x"},
        {"messages": [SYSTEM, *chat("Q?", "A.")]},
    ),
    "sharegpt": (
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q?"},
                           {"from": "gpt", "value": "A."}]},
        {"messages": [SYSTEM, *chat("Q?", "A.")]},
    ),
    "alpaca_with_input": (
        {"instruction": "Summarise.", "input": "Long text.", "output": "Short.", "system": "Be brief."},
        {"messages": [SYSTEM, *chat("Summarise.\n\nLong text.", "Short.")]},
    ),
    "alpaca_without_input": (
        {"instruction": "Summarise.", "input": "", "output": "Short."},
        {"messages": chat("Summarise.", "Short.")},
    ),
    "prompt_completion": ({"prompt": "Q?", "completion": " A.", "id": 3},
                          {"prompt": "Q?", "completion": " A."}),
    "text_custom_field": ({"body": "Some text.", "title": "t"}, {"text": "Some text."}),
    "seed_prompt": ({"prompt": f"{BOS}<|start_header_id|>user<|end_header_id|>\n\nQ?"}, {"text": (
        "<|start_header_id|>user<|end_header_id|>\n\nQ?")}),
}  # fmt: skip
RESOLVED = {"sharegpt": "messages", "alpaca_with_input": "alpaca", "alpaca_without_input": "alpaca"}


@pytest.mark.parametrize("case", FORMAT_CASES)
@pytest.mark.parametrize("fmt", ["auto", "explicit"])
def test_formats(run, tmp_path, case, fmt):
    row, expected = FORMAT_CASES[case]
    resolved = RESOLVED.get(case, case.split("_custom")[0].replace("seed_prompt", "text"))
    text_field = {"text_custom_field": "body", "seed_prompt": "prompt"}.get(case, "text")
    options = {"text_field": text_field} if fmt == "explicit" or case == "text_custom_field" else {}
    report = run(
        write_jsonl(tmp_path / "d.jsonl", [row]), format=resolved if fmt == "explicit" else "auto", **options
    )
    assert run.train == [expected] and run.eval == []
    assert report["format"] == resolved
    assert report["text_field"] == (text_field if resolved == "text" else None)


def test_seed_format_strips_bos_and_counts_it(run, tmp_path):
    rows = [{"prompt": f"{BOS}text {i}<|eot_id|>"} for i in range(3)] + [{"prompt": "no bos here"}]
    report = run(write_jsonl(tmp_path / "seed.jsonl", rows), eval_fraction=0)
    assert report["bos_stripped"] == 3 and report["format"] == "text"
    assert sorted(r["text"] for r in run.train) == ["no bos here"] + [f"text {i}<|eot_id|>" for i in range(3)]
    assert all(set(r) == {"text"} for r in run.train)  # no column named prompt reaches TRL


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["text", "conversations", "prompt", "completion"], ("messages", "text")),
        (["prompt", "completion", "instruction", "output", "text"], ("prompt_completion", "text")),
        (["instruction", "output", "text"], ("alpaca", "text")),
        (["text", "prompt"], ("text", "text")),
        (["prompt", "id"], ("text", "prompt")),
    ],
)
def test_auto_detection_order(columns, expected):
    assert dataset_source.resolve_format(columns, "auto", "text", "p") == expected


# --- split, sampling, determinism ---------------------------------------------------------------------------


def test_max_samples_and_eval_fraction(run, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PC_ROWS)
    report = run(data, max_samples=10, eval_fraction=0.2)
    assert (report["kept"], report["train_rows"], report["eval_rows"]) == (12, 8, 2)
    assert not {json.dumps(r) for r in run.train} & {json.dumps(r) for r in run.eval}
    report = run(data, eval_fraction=0)
    assert (report["train_rows"], report["eval_rows"]) == (12, 0)
    assert (run.out / "eval.jsonl").read_text() == ""
    report = run(write_jsonl(tmp_path / "three.jsonl", PC_ROWS[:3]), eval_fraction=0.05)
    assert (report["train_rows"], report["eval_rows"]) == (2, 1)  # at least one eval row
    report = run(write_jsonl(tmp_path / "one.jsonl", PC_ROWS[:1]), eval_fraction=0.5)
    assert (report["train_rows"], report["eval_rows"]) == (1, 0)


def test_outputs_are_deterministic(model_json, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PC_ROWS)
    outputs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        Run(model_json, tmp_path / name)(data, seed=seed, eval_fraction=0.25)
        outputs.append(
            [(tmp_path / name / f).read_bytes() for f in ("train.jsonl", "eval.jsonl", "report.json")]
        )
    assert outputs[0] == outputs[1]
    assert outputs[0][:2] != outputs[2][:2]  # another seed, another shuffle


def test_cli_arguments_of_the_rule():
    argv = (
        "--path P --format auto --text-field text --split train --config-name null --max-samples null "
        "--eval-fraction 0.1 --long-rows drop --max-dropped-fraction 0.5 --seed 42 --max-seq-length 256 "
        "--model-json m.json --train-out t.jsonl --eval-out e.jsonl --report-out r.json"
    ).split()
    cfg = parse_args(prepare_data.Config, argv)
    assert cfg.config_name is None and cfg.max_samples is None
    assert (cfg.eval_fraction, cfg.seed, cfg.max_seq_length) == (0.1, 42, 256)
    assert parse_args(prepare_data.Config, argv + ["--max-samples", "5"]).max_samples == 5
